"""Readers of source datasets: each parses annotations into sorted ``SourceItem`` s (no image is
opened), with an ``Issue`` for every input that cannot be used."""
