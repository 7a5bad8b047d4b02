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


def test_architecture_module_table_matches_the_tree():
    """docs/ARCHITECTURE.md lists every module of the package once, and nothing else."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Modules (one job each)", 1)[1].split("\n## ", 1)[0]
    listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    tree = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == tree


def test_long_modules_say_why_at_the_top():
    """A module over 350 lines states its reason in its docstring ("One module ... on purpose")."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 350:
            head = text.split('"""')[1] if text.startswith('"""') else ""
            assert "One module" in head, f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines"
