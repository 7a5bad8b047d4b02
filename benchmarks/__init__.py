"""Benchmark matrix and report (not part of the installed package)."""
