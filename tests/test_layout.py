"""Module boundaries: the package's layers import only downwards and no module imports itself
back through others; the evaluation command does not load the training loop, and the model's
post-processing does not load the data pipeline."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# The layers, bottom to top: a module may import from its own layer and the layers below it,
# never from one above (function-level imports count). Every module of the package is in one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # no hvd_yolo imports above this layer: the version, the config dataclasses (with the model's
    # choices and official anchors), COCO scoring and matched pairs (pycocotools), figures, the
    # out_dir lock, output guards, stop signals, progress lines, the stall watchdog, the mpirun
    # line, the simulated cluster, emulated regimes and the scaling model
    ("base", ("__init__.py", "config.py", "metrics.py", "matches.py", "plots.py", "runlock.py",
              "outputs.py", "sigterm.py", "progress.py", "stall.py", "launch.py", "cluster.py",
              "regime.py", "scaling.py")),
    ("shards", ("shards/",)),  # source datasets -> shards (offline)
    ("data", ("data/",)),  # shards -> batches (online)
    # the network, its loss and decoding; checkpoint files (which rebuild a model)
    ("model", ("model/", "checkpoint.py", "export.py")),
    ("comm", ("comm/",)),  # Horovod and the GradSync the loop steps
    # the training loop and what it runs: optimizer and LR, evaluation
    ("loop", ("loop/", "optim.py", "evaluate.py")),
    # what the user runs: the CLI, its commands, the benchmarks behind `hvd-yolo bench`
    ("commands", ("commands/", "cli.py", "bench/")),
]


def module_name(path: Path, root: Path) -> str:
    """``hvd_yolo/comm/base.py`` -> ``hvd_yolo.comm.base``; a package's ``__init__`` -> it."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth: ``from a.b import c`` is
    ``a.b.c`` where that is a module, else ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every module of the package ``root`` -> the package's modules it imports."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: package_imports(p, root, set(paths)) - {name} for name, p in paths.items()}


def layer_of(name: str, root: Path) -> int:
    rel = name.removeprefix(root.name).lstrip(".").replace(".", "/")
    candidates = (f"{rel}.py", f"{rel}/__init__.py" if rel else "__init__.py")
    for i, (_, members) in enumerate(LAYERS):
        for rel_path in candidates:
            if (root / rel_path).exists() and any(
                    rel_path == m or (m.endswith("/") and rel_path.startswith(m)) for m in members):
                return i
    raise AssertionError(f"{name} is in no layer: add it to tests/test_layout.py's LAYERS")


def upward_imports(root: Path) -> list[str]:
    """Each import of a module from a layer above the importer's, as text."""
    graph = import_graph(root)
    out = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, root) > layer_of(name, root):
                out.append(f"{name} ({LAYERS[layer_of(name, root)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target, root)][0]})")
    return out


def import_cycles(root: Path) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_module_imports_only_from_its_layer_and_below():
    assert upward_imports(PACKAGE) == []


def test_no_import_cycle():
    assert import_cycles(PACKAGE) == []


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """A copy of the package's sources to damage."""
    root = tmp_path / "hvd_yolo"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_an_upward_import_is_caught(planted: Path):
    """comm importing the loop inside a function (the kind of import that hid the old cycles)."""
    base = planted / "comm" / "base.py"
    base.write_text(base.read_text() + "\n\ndef planted():\n    from hvd_yolo.loop import fixed\n")
    assert upward_imports(planted) == [
        "hvd_yolo.comm.base (comm) imports hvd_yolo.loop.fixed (loop)"]
    assert any("hvd_yolo.comm.base" in group for group in import_cycles(planted))


def test_a_cycle_inside_one_layer_is_caught(planted: Path):
    """Two modules of one layer importing each other pass the layer check, not this one."""
    for path, other in (("augment.py", "sampler"), ("sampler.py", "augment")):
        module = planted / "data" / path
        module.write_text(module.read_text() + f"\n\ndef planted():\n"
                          f"    from hvd_yolo.data import {other}\n")
    assert upward_imports(planted) == []
    assert import_cycles(planted) == [["hvd_yolo.data.augment", "hvd_yolo.data.sampler"]]


def test_a_module_outside_every_layer_is_refused(planted: Path):
    (planted / "stray.py").write_text("import hvd_yolo.comm\n")
    with pytest.raises(AssertionError, match="hvd_yolo.stray is in no layer"):
        upward_imports(planted)


def test_eval_command_does_not_import_the_training_loop():
    for path in (PACKAGE / "commands" / "eval.py", PACKAGE / "evaluate.py"):
        assert not any(m.startswith("hvd_yolo.loop") for m in imported_modules(path)), path


def test_no_function_of_the_loop_is_over_60_lines():
    long = []
    for path in sorted((PACKAGE / "loop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines}")
    assert long == []


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


def module_jobs(doc: str) -> dict[str, str]:
    """docs/ARCHITECTURE.md's module table: module path -> its one job."""
    section = doc.split("## Modules (one job each)", 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1]: line.split(" | ", 1)[1] for line in section.splitlines()
            if line.startswith("| `")}


REASON = re.compile(r"Over 350 lines on purpose: one job, ([^;]+); (.+?)\.(?:\s|$)")


def long_module_problems(root: Path, jobs: dict[str, str], limit: int = 350) -> list[str]:
    """A module over ``limit`` lines must say why in its docstring: ``Over 350 lines on
    purpose: one job, <job>; <why>.``, where <job> is (words of) its job in the module table
    and <why> a reason, not a word."""
    def plain(text: str) -> str:
        return " ".join(text.replace("`", "").lower().split())

    problems = []
    for path in sorted(root.rglob("*.py")):
        rel, text = str(path.relative_to(root)), path.read_text()
        if text.count("\n") <= limit:
            continue
        m = REASON.search(" ".join((ast.get_docstring(ast.parse(text)) or "").split()))
        if m is None:
            problems.append(f"{rel}: {text.count(chr(10))} lines and no 'Over 350 lines on "
                            f"purpose: one job, <its job>; <why>.' in its docstring")
        elif plain(m.group(1)) not in plain(jobs.get(rel, "")):
            problems.append(f"{rel}: '{m.group(1)}' is not its job in the module table")
        elif len(m.group(2).split()) < 8:
            problems.append(f"{rel}: '{m.group(2)}' is no reason")
    return problems


def test_long_modules_say_why_naming_their_one_job():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    assert long_module_problems(PACKAGE, module_jobs(doc)) == []


def test_a_long_module_without_its_job_is_caught(tmp_path: Path):
    jobs = {"a.py": "`a`: reads the shards", "b.py": "`b`: writes the shards"}
    body = "\n".join(f"x{i} = {i}" for i in range(360)) + "\n"
    why = "the reader and its index share one table layout, split they would copy it"
    (tmp_path / "a.py").write_text('"""Over 350 lines on purpose: one job, reads the shards; '
                                   f'{why}."""\n' + body)
    (tmp_path / "b.py").write_text('"""Over 350 lines on purpose: one job, the whole CLI; '
                                   f'{why}."""\n' + body)
    (tmp_path / "c.py").write_text('"""One module on purpose."""\n' + body)
    (tmp_path / "d.py").write_text('"""Short."""\n')
    assert long_module_problems(tmp_path, jobs) == [
        "b.py: 'the whole CLI' is not its job in the module table",
        "c.py: 361 lines and no 'Over 350 lines on purpose: one job, <its job>; <why>.' in its "
        "docstring"]
