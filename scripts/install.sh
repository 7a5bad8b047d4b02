#!/usr/bin/env bash
# One idempotent install path for hvd_yolo, used by the README (make demo / make test), CI and
# the Docker images. It installs:
#   1. system packages (Open MPI, cmake, g++) when missing and we are root;
#   2. a virtualenv in .venv with torch/torchvision pinned for this CPU architecture and the
#      pure-Python dependencies;
#   3. Horovod 0.28.1 built from the PyPI sdist, patched for today's PyTorch (C++ standard taken
#      from the installed torch), with PyTorch + MPI + Gloo required (NCCL when a GPU and CUDA
#      toolkit are present). The built wheel is cached outside the clone in
#      ${HVD_YOLO_CACHE:-~/.cache/hvd_yolo}/wheels/<key>/ keyed by horovod, torch, Python and MPI
#      versions, so a second clone on the same machine skips the ~6 min build.
# Environment knobs: PYTHON (interpreter for the venv), VENV (default .venv), TORCH_VERSION /
# TORCHVISION_VERSION (override the pins), HVD_YOLO_CACHE, HOROVOD_VERSION,
# HVD_YOLO_GPU=0|1 (force NCCL off/on), HOROVOD_BUILD_CUDA_CC_LIST (CUDA archs to compile).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HVD_YOLO_CACHE:-$HOME/.cache/hvd_yolo}
log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. system packages
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] \
  || command -v mpicxx >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
# Optional, root only: the simulated cluster (hvd-yolo cluster, tests/test_multinode.py).
if [ "$(id -u)" = 0 ]; then
  [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
  command -v tc >/dev/null 2>&1 || need_apt+=(iproute2)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    die "missing system packages: ${need_apt[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${need_apt[*]}; on a cluster: module load openmpi cmake gcc) and run again."
  fi
fi
command -v mpicxx >/dev/null 2>&1 || die "mpicxx not found after install: Open MPI development files are required (libopenmpi-dev)."

# ---------------------------------------------------------------- 2. virtualenv + python deps
if [ -z "${TORCH_VERSION:-}" ]; then
  case "$(uname -m)" in
    x86_64) TORCH_VERSION=2.14.1; TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1} ;;
    aarch64|arm64) TORCH_VERSION=2.9.1; TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.24.1} ;;
    *) die "no tested torch/torchvision pair for $(uname -m): set TORCH_VERSION and TORCHVISION_VERSION" ;;
  esac
fi
[ -n "${TORCHVISION_VERSION:-}" ] || die "TORCH_VERSION is set: set TORCHVISION_VERSION too"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$here/$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

have_pkg() { "$PY" - "$@" <<'PYEOF'
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    name, _, below = name.partition("<")  # "name<N": a major version below N
    try:
        got = m.version(name)
    except m.PackageNotFoundError:
        sys.exit(1)
    if ver and got.split("+")[0] != ver:
        sys.exit(1)
    if below and int(got.split(".")[0]) >= int(below):
        sys.exit(1)
PYEOF
}

if ! have_pkg "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (large; one time per venv)"
  "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
# opencv-python-headless: tests only (tests/test_official_weights.py: OpenCV's Darknet reader,
# which OpenCV 5 no longer has).
deps=(numpy h5py mpi4py pycocotools tqdm pyyaml pillow zlib-ng cloudpickle psutil packaging matplotlib
      tensorboard onnx onnxruntime
      setuptools wheel pytest pytest-timeout hypothesis ruff "opencv-python-headless<5")
if ! have_pkg "${deps[@]}"; then
  log "installing python dependencies"
  "${PIP[@]}" install "${deps[@]}"
fi

# ---------------------------------------------------------------- 3. horovod
torch_ver=$("$PY" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
py_ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mpi_ver=$(mpirun --version 2>/dev/null | head -n1 | tr -cs 'A-Za-z0-9.' '-' | sed 's/-$//')
gpu=${HVD_YOLO_GPU:-}
if [ -z "$gpu" ]; then
  gpu=0
  if [ -n "$torch_cuda" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
fi
# A CUDA torch makes Horovod compile its CUDA pieces when torch finds a CUDA toolkit (nvcc);
# without one (PyPI's torch in a CPU-only container), a CPU build is the only one possible.
cuda_home=""
if [ -n "$torch_cuda" ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda_home/bin/nvcc" ] || cuda_home=""
  if [ -z "$cuda_home" ] && [ "$gpu" = 1 ]; then
    die "torch $torch_ver is a CUDA build and a GPU build was asked for, but nvcc was not found under ${CUDA_HOME:-/usr/local/cuda} (set CUDA_HOME)"
  fi
fi
key="horovod-${HOROVOD_VERSION}_torch-${torch_ver}_py-${py_ver}_${mpi_ver}_nccl-${gpu}"
[ -n "$torch_cuda" ] && [ -z "$cuda_home" ] && key+="_nocuda"
wheel_dir="$CACHE/wheels/$key"

horovod_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PYEOF
}

if have_pkg "horovod==$HOROVOD_VERSION" && horovod_ok; then
  log "horovod $HOROVOD_VERSION already installed in $VENV"
else
  whl=$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$whl" ]; then
    log "using cached Horovod wheel (skipping the build): $whl"
  else
    log "building Horovod $HOROVOD_VERSION for torch $torch_ver (cache key $key); this takes several minutes"
    build=$(mktemp -d "${TMPDIR:-/tmp}/hvd_yolo_horovod.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
    tar -xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    std=$("$PY" "$here/scripts/torch_cxx_standard.py")
    top_std=$(( std > 17 ? 17 : std ))
    log "C++ standard from the installed torch headers: horovod/torch C++$std, top level C++$top_std"
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $top_std)/" "$src/CMakeLists.txt"
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $std)/" "$src/horovod/torch/CMakeLists.txt"
    grep -q "CMAKE_CXX_STANDARD $std" "$src/horovod/torch/CMakeLists.txt" || die "could not patch horovod/torch/CMakeLists.txt"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS=${HOROVOD_BUILD_ARCH_FLAGS:-}
    if [ -n "$torch_cuda" ] && [ -z "$cuda_home" ]; then
      # torch.utils.cpp_extension finds no CUDA_HOME, so Horovod builds its CPU extension.
      log "torch $torch_ver is a CUDA build but no CUDA toolkit (nvcc) is here: building Horovod for CPU"
      unset CUDA_HOME CUDA_PATH
    elif [ -n "$torch_cuda" ]; then
      # A CUDA build of torch with a toolkit present: Horovod compiles its CUDA pieces, even on
      # a machine without a GPU.
      export CUDA_HOME="$cuda_home" CUDAToolkit_ROOT="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home"
      export PATH="$cuda_home/bin:$PATH"
      # Compile the kernels for a few current architectures only (the full list is slow).
      export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
    fi
    if [ "$gpu" = 1 ]; then
      export HOROVOD_GPU_OPERATIONS=NCCL
      log "GPU present: building with HOROVOD_GPU_OPERATIONS=NCCL"
    fi
    mkdir -p "$wheel_dir"
    ( cd "$src" && "$PY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps -w "$build/out" . \
        > "$build/build.log" 2>&1 ) || { tail -n 60 "$build/build.log" >&2; die "Horovod build failed (full log above, last 60 lines)"; }
    cp "$build"/out/horovod-*.whl "$wheel_dir/"
    whl=$(ls "$wheel_dir"/horovod-*.whl | head -n1)
    log "built and cached $whl"
  fi
  "${PIP[@]}" install --no-deps --force-reinstall "$whl"
  "${PIP[@]}" install cloudpickle psutil pyyaml packaging
fi

# Fail loudly if Horovod lacks what we need.
check=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $check"
for want in "PyTorch" "MPI" "Gloo"; do
  echo "$check" | grep -Eq "\[X\] $want\b" || die "Horovod was built without $want:\n$check"
done
log "horovod check-build OK (PyTorch, MPI, Gloo)"

# ---------------------------------------------------------------- 4. this package
if ! "$PY" -c 'import hvd_yolo' 2>/dev/null || ! [ -x "$VENV/bin/hvd-yolo" ]; then
  log "installing hvd_yolo (editable)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
fi
log "done: $("$PY" -c 'import torch, horovod; print("torch", torch.__version__, "horovod", horovod.__version__)')"
