"""Module boundaries: the evaluation command does not load the training loop, and the model's
post-processing does not load the data pipeline."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import hvd_yolo

PACKAGE = Path(hvd_yolo.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_eval_command_does_not_import_the_training_loop():
    assert "hvd_yolo.train" not in imported_modules(PACKAGE / "commands" / "eval.py")
    assert "hvd_yolo.train" not in imported_modules(PACKAGE / "evaluate.py")


def test_postprocess_does_not_load_the_data_pipeline():
    code = ("import sys, hvd_yolo.model.postprocess; "
            "print(sorted(m for m in sys.modules if m.startswith('hvd_yolo.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_reading_shards_turns_hdf5_file_locking_off():
    code = ("import os, hvd_yolo.data.dataset, hvd_yolo.shards.convert; "
            "print(os.environ.get('HDF5_USE_FILE_LOCKING'))")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, env=env, check=True)
    assert out.stdout.strip() == "FALSE"
