#!/usr/bin/env bash
# GPU check of hvd_yolo's CUDA path, for a machine with an NVIDIA GPU (checked on an H100
# with Python 3.12 + torch cu130 + the nvidia-nccl-cu13 wheel, no MPI, no network access).
#
#   scripts/gpu_check.sh [STAGE ...]        stages: build collectives train bench (default: all)
#
# build        Horovod 0.28.1 from the sdist with NCCL (HOROVOD_GPU_OPERATIONS=NCCL), PyTorch and
#              Gloo (MPI too when mpicxx is there), against this machine's torch, in a temp dir;
#              C++ standard patched as scripts/install.sh does. The wheel is stripped of debug info
#              (71 MB -> ~3 MB) and kept in .devbuild/wheel/ (and copied to $OUT) so that a later
#              call carries it instead of rebuilding. A wheel there whose BUILD_KEY matches this
#              torch/Python/NCCL/MPI is reused.
# (always)     installs that wheel (+ .whl/*.whl, e.g. pycocotools) with pip --target into a temp
#              dir on PYTHONPATH; the repo itself is put on PYTHONPATH; `hvd-yolo` is a wrapper.
# collectives  horovodrun --check-build; allreduce/allgather/broadcast/reducescatter/grouped/fp16
#              compression on CUDA tensors, DistributedOptimizer + GradScaler (the train.py
#              pattern) on 1 rank, with a timeline proving the NCCL ops ran; then the same on
#              2 ranks sharing the GPU through `horovodrun --gloo -np 2`.
# train        synthetic data -> `hvd-yolo convert` -> `hvd-yolo train` on CUDA (AMP) under
#              `horovodrun --gloo -np 1`, yolov3-tiny (with eval) and yolov3.
# bench        `hvd-yolo bench train` for yolov3 / yolov3-tiny at 416, fp16 vs none compression.
#
# Prints a summary table (check, status, detail) at the end and writes it, the logs and the
# wheel under $OUT (default .devbuild/out). Exit status: number of FAILed checks (capped at 100).
# Knobs: PY (python3), HVD_SDIST (.devbuild/horovod-0.28.1.tar.gz), HOROVOD_BUILD_CUDA_CC_LIST
# (90), MAKEFLAGS (-j<cores>), GPU_CHECK_MPI=auto|0|1, GPU_CHECK_REBUILD=1 (ignore a saved wheel),
# GPU_CHECK_WHEEL_DIR (.devbuild/wheel), GPU_CHECK_ALLOW_NO_GPU=1 (build + install only, for a
# dry run of the build on a machine without a GPU), GPU_CHECK_TRAIN_IMAGES (256), GPU_CHECK_EPOCHS (3), GPU_CHECK_BENCH_ARGS (extra bench args).
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PY=${PY:-python3}
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, not resolved
OUT=${OUT:-$here/.devbuild/out}
mkdir -p "$OUT"
STAGES=" ${*:-build collectives train bench} "
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=$WORK/site
RESULTS=$OUT/gpu_check_results.tsv
LOG=$OUT/gpu_check.log
WHEEL_DIR=${GPU_CHECK_WHEEL_DIR:-$here/.devbuild/wheel}
HOROVOD_VERSION=0.28.1
: >"$RESULTS"
: >"$LOG"
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
export PYTHONUNBUFFERED=1 HDF5_USE_FILE_LOCKING=FALSE OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

say() { printf '\n=== %s\n' "$*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3//$'\t'/ }" >>"$RESULTS"; printf '[%s] %s: %s\n' "$2" "$1" "$3" | tee -a "$LOG"; }
has_stage() { [[ "$STAGES" == *" $1 "* ]]; }
# run_logged NAME TIMEOUT CMD...: run with a timeout, output to the log and to $WORK/NAME.log
run_logged() {
  local name=$1 limit=$2; shift 2
  printf '$ %s\n' "$*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  tail -n 25 "$WORK/$name.log"
  [ $rc = 124 ] && echo "(timed out after ${limit}s)" | tee -a "$LOG"
  return $rc
}

summary() {
  say "summary"
  "$PY" - "$RESULTS" <<'PYEOF' | tee "$OUT/gpu_check_summary.txt" | tee -a "$LOG"
import sys
rows = [line.rstrip("\n").split("\t", 2) for line in open(sys.argv[1]) if line.strip()]
rows = [r + [""] * (3 - len(r)) for r in rows]
w0 = max([5] + [len(r[0]) for r in rows]); w1 = max([6] + [len(r[1]) for r in rows])
print(f"| {'check':<{w0}} | {'status':<{w1}} | detail")
print(f"|-{'-' * w0}-|-{'-' * w1}-|-------")
for name, status, detail in rows:
    print(f"| {name:<{w0}} | {status:<{w1}} | {detail}")
PYEOF
}
finish() {
  summary
  local fails
  fails=$(cut -f2 "$RESULTS" | grep -c '^FAIL' || true)
  echo "failed checks: $fails (logs: $OUT)"
  rm -rf "$WORK"
  exit $(( fails > 100 ? 100 : fails ))
}

# ------------------------------------------------------------------------------ environment
say "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  echo "mpirun: $(command -v mpirun || echo none)  mpicxx: $(command -v mpicxx || echo none)"
  echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"
  echo "cmake: $(cmake --version 2>/dev/null | head -n1)  g++: $(g++ -dumpfullversion 2>/dev/null)  cores: $CORES"
} 2>&1 | tee -a "$LOG"
env_line=$("$PY" - <<'PYEOF' 2>&1
import sys, torch
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
      f"GPU {torch.cuda.get_device_name(0) if cuda else 'none'}; "
      f"torch NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if cuda else '-'}")
PYEOF
)
echo "$env_line" | tee -a "$LOG"
record environment info "$env_line"
HAVE_GPU=1
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  HAVE_GPU=0
  if [ -n "${GPU_CHECK_ALLOW_NO_GPU:-}" ]; then
    record cuda skipped "no GPU: GPU_CHECK_ALLOW_NO_GPU is set, so only build + install run"
  else
    record cuda FAIL "torch.cuda.is_available() is False: this script needs a GPU"
    finish
  fi
fi

NCCL_DIR=$("$PY" -c 'import nvidia.nccl as m, os; print(os.path.realpath(list(m.__path__)[0]))' 2>/dev/null || true)
if [ -z "$NCCL_DIR" ] || [ ! -f "$NCCL_DIR/include/nccl.h" ]; then
  record nccl FAIL "no nvidia-nccl wheel with include/nccl.h in $PY's site-packages (pip install nvidia-nccl-cu13)"
  finish
fi
nccl_ver=$(awk '/#define NCCL_(MAJOR|MINOR|PATCH) /{v=v (v?".":"") $3} END{print v}' "$NCCL_DIR/include/nccl.h")
NCCL_SO=$(ls "$NCCL_DIR"/lib/libnccl.so* 2>/dev/null | head -n1)
echo "NCCL $nccl_ver from $NCCL_DIR ($NCCL_SO)" | tee -a "$LOG"
export LD_LIBRARY_PATH="$NCCL_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

case "${GPU_CHECK_MPI:-auto}" in
  1) with_mpi=1 ;; 0) with_mpi=0 ;;
  *) if command -v mpicxx >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1; then with_mpi=1; else with_mpi=0; fi ;;
esac
torch_ver=$("$PY" -c 'import torch; print(torch.__version__)')
py_ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key="horovod-$HOROVOD_VERSION torch-$torch_ver py-$py_ver nccl-$nccl_ver mpi-$with_mpi cc-${HOROVOD_BUILD_CUDA_CC_LIST:-90}"

# ------------------------------------------------------------------------------ build
WHEEL=""
if [ -z "${GPU_CHECK_REBUILD:-}" ] && [ -f "$WHEEL_DIR/BUILD_KEY" ] && [ "$(cat "$WHEEL_DIR/BUILD_KEY")" = "$key" ]; then
  WHEEL=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1)
  [ -n "$WHEEL" ] && record build reused "$(basename "$WHEEL") ($key)"
fi
if [ -z "$WHEEL" ]; then
  if ! has_stage build; then
    record build FAIL "no saved wheel for '$key' in $WHEEL_DIR and the build stage was not asked for"
    finish
  fi
  say "building Horovod $HOROVOD_VERSION with NCCL ($key)"
  sdist=${HVD_SDIST:-$here/.devbuild/horovod-$HOROVOD_VERSION.tar.gz}
  [ -f "$sdist" ] || { record build FAIL "sdist $sdist not found (pip download --no-deps --no-binary :all: horovod==$HOROVOD_VERSION)"; finish; }
  build=$WORK/build
  mkdir -p "$build/nccl_lib" "$build/dist"
  b0=$SECONDS
  tar -xzf "$sdist" -C "$build"
  src=$build/horovod-$HOROVOD_VERSION
  std=$("$PY" "$here/scripts/torch_cxx_standard.py")
  top_std=$(( std > 17 ? 17 : std ))
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $top_std)/" "$src/CMakeLists.txt"
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $std)/" "$src/horovod/torch/CMakeLists.txt"
  echo "C++ standard from torch headers: horovod/torch C++$std, top level C++$top_std" | tee -a "$LOG"
  # FindNCCL looks for libnccl.so; the wheel ships libnccl.so.2 only.
  ln -sf "$NCCL_SO" "$build/nccl_lib/libnccl.so"
  # The toolkit: $CUDA_HOME, else /usr/local/cuda, else the folder above the real nvcc.
  cuda_home=${CUDA_HOME:-}
  for c in "$cuda_home" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x)")")")"; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then cuda_home=$c; break; fi
  done
  [ -x "$cuda_home/bin/nvcc" ] || { record build FAIL "no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) at CUDA_HOME, /usr/local/cuda or beside nvcc: set CUDA_HOME"; finish; }
  echo "CUDA toolkit: $cuda_home ($("$cuda_home/bin/nvcc" --version | grep -o 'release [0-9.]*'))" | tee -a "$LOG"
  # Horovod's setup.py lists its install requirements as setup_requires (cloudpickle, psutil,
  # pyyaml, packaging, cffi) and setuptools would fetch missing ones from PyPI: offline, carry
  # them as wheels in .whl/build/ (cffi + pycparser were missing on the H100 image).
  build_path=""
  if ls "$here"/.whl/build/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --target "$build/site" "$here"/.whl/build/*.whl >>"$LOG" 2>&1 && build_path=$build/site
  fi
  (
    [ -n "$build_path" ] && export PYTHONPATH="$build_path${PYTHONPATH:+:$PYTHONPATH}"
    # CMake >= 4 refuses cmake_minimum_required(VERSION < 3.5) (third_party/gloo says 2.8.12).
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    # GCC >= 13 no longer includes <string>/<cstdint>/<stdexcept> transitively, and Horovod
    # 0.28.1 relies on it (horovod/common/group_table.h: std::string; common.h: logic_error).
    export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string -include stdexcept -include limits"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
    export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$build/nccl_lib"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$with_mpi" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    export CUDA_HOME="$cuda_home" CUDAToolkit_ROOT="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home"
    export PATH="$cuda_home/bin:$PATH" HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-90}
    export MAKEFLAGS=${MAKEFLAGS:--j$CORES}
    env | grep -E '^(HOROVOD_|CUDA|MAKEFLAGS|CMAKE_|CXX|PYTHONPATH)' | sort
    echo "cmake: $(command -v cmake) $(cmake --version | head -n1); c++: $(command -v "${CXX:-c++}") $("${CXX:-c++}" -dumpfullversion)"
    cd "$src" && "$PY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps \
      --no-index -w "$build/dist" .
  ) >"$OUT/horovod_build.log" 2>&1
  rc=$?
  t_build=$(( SECONDS - b0 ))
  grep -E 'NCCL|HOROVOD_|C\+\+ standard' "$OUT/horovod_build.log" | grep -E 'Found NCCL|NCCL_VERSION_CODE|HOROVOD_GPU|HOROVOD_WITH' | head -n 12 | tee -a "$LOG"
  raw=$(ls "$build"/dist/horovod-*.whl 2>/dev/null | head -n1)
  if [ $rc != 0 ] || [ -z "$raw" ]; then
    tail -n 60 "$OUT/horovod_build.log" | tee -a "$LOG"
    record build FAIL "pip wheel exit $rc; log: horovod_build.log"
    finish
  fi
  # Strip debug info from the extension modules and rewrite RECORD (pure zipfile, no `wheel` CLI).
  mkdir -p "$WHEEL_DIR"
  rm -f "$WHEEL_DIR"/horovod-*.whl "$WHEEL_DIR/BUILD_KEY"
  WHEEL=$WHEEL_DIR/$(basename "$raw")
  "$PY" - "$raw" "$WHEEL" <<'PYEOF' 2>&1 | tee -a "$LOG"
import base64, hashlib, os, subprocess, sys, tempfile, zipfile
src, dst = sys.argv[1:]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    lines = []
    for info in zin.infolist():
        if info.filename == record_name:
            continue
        data = zin.read(info)
        if info.filename.endswith(".so"):
            with tempfile.NamedTemporaryFile(suffix=".so", delete=False) as tmp:
                tmp.write(data)
            subprocess.run(["strip", "--strip-debug", tmp.name], check=True)
            data = open(tmp.name, "rb").read()
            os.unlink(tmp.name)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
print(f"stripped wheel: {os.path.getsize(src) >> 20} MiB -> {os.path.getsize(dst) >> 20} MiB")
PYEOF
  echo "$key" >"$WHEEL_DIR/BUILD_KEY"
  cp "$WHEEL" "$WHEEL_DIR/BUILD_KEY" "$OUT/"
  record build ok "$(basename "$WHEEL") in ${t_build}s with ${MAKEFLAGS:--j$CORES} ($key)"
fi

# ------------------------------------------------------------------------------ install
say "installing $(basename "$WHEEL") into $SITE"
extra=$(ls "$here"/.whl/*.whl 2>/dev/null || true)
# shellcheck disable=SC2086
if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
     --no-cache-dir --target "$SITE" "$WHEEL" $extra >"$WORK/pip.log" 2>&1; then
  cat "$WORK/pip.log" | tee -a "$LOG"
  record install FAIL "pip install --target failed (see log)"
  finish
fi
export PYTHONPATH="$SITE:$here${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
printf '#!/bin/sh\nexec "%s" -m hvd_yolo.cli "$@"\n' "$(command -v "$PY")" >"$SITE/bin/hvd-yolo"
chmod +x "$SITE/bin/hvd-yolo"
record install ok "horovod + $(echo "$extra" | xargs -n1 basename 2>/dev/null | cut -d- -f1-2 | tr '\n' ' ')on PYTHONPATH"

[ "$HAVE_GPU" = 1 ] || finish

# ------------------------------------------------------------------------------ collectives
cat >"$WORK/collectives.py" <<'PYEOF'
"""Horovod collectives on CUDA tensors; rank 0 prints check.<name>=ok|FAIL: detail."""
import copy
import time

import horovod.torch as hvd
import torch

hvd.init()
torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
dev = torch.device("cuda", torch.cuda.current_device())
r, n = hvd.rank(), hvd.size()
ok_count, total = 0, 0


def check(name, fn):
    global ok_count, total
    total += 1
    try:
        detail, status = fn(), "ok"
        ok_count += 1
    except Exception as exc:  # report and go on: each check is independent
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
    if r == 0:
        print(f"check.{name}={status}: {detail}", flush=True)


def on_cuda(t):
    assert t.is_cuda, f"result on {t.device}"
    return t


def allreduce_sum():
    base = torch.arange(1 << 20, device=dev, dtype=torch.float32)
    y = on_cuda(hvd.allreduce(base + r, op=hvd.Sum, name="ar_sum"))
    assert torch.equal(y, n * base + n * (n - 1) / 2), "wrong sum"
    z = base + r
    hvd.allreduce_(z, op=hvd.Average, name="ar_avg_inplace")
    assert torch.allclose(z, base + (n - 1) / 2), "wrong in-place average"
    h = (torch.arange(1000, device=dev) + r).half()
    hs = on_cuda(hvd.allreduce(h, op=hvd.Sum, name="ar_half"))
    assert hs.dtype == torch.float16 and torch.equal(hs.float(), n * torch.arange(1000, device=dev).float() + n * (n - 1) / 2)
    return f"fp32 sum/avg (4 MiB) and fp16 sum exact on {n} rank(s)"


def fp16_compression():
    g = torch.Generator(device=dev).manual_seed(1)
    xs = [torch.randn(1 << 16, device=dev, generator=g) for _ in range(n)]
    y = on_cuda(hvd.allreduce(xs[r], op=hvd.Average, name="ar_fp16c", compression=hvd.Compression.fp16))
    want = torch.stack(xs).mean(0)
    err = (y - want).abs().max().item()
    assert y.dtype == torch.float32, y.dtype
    assert err < 5e-3, f"max error {err}"
    assert err > 0, "no fp16 rounding at all: compression not applied?"
    return f"fp32 in/out, max abs error {err:.2e} vs fp32 mean (fp16 rounding visible)"


def allgather():
    t = torch.full((r + 1, 3), float(r), device=dev)
    g = on_cuda(hvd.allgather(t, name="ag"))
    want = torch.cat([torch.full((k + 1, 3), float(k), device=dev) for k in range(n)])
    assert torch.equal(g, want), f"got shape {tuple(g.shape)}"
    return f"uneven first dims -> {tuple(g.shape)}"


def broadcast():
    t = torch.full((1 << 18,), float(r + 1), device=dev)
    b = on_cuda(hvd.broadcast(t, root_rank=0, name="bc"))
    assert torch.all(b == 1.0)
    hvd.broadcast_(t, root_rank=0, name="bc_inplace")
    assert torch.all(t == 1.0)
    return "root 0 values on every rank (copy and in-place)"


def reducescatter():
    t = torch.arange(4 * n, device=dev, dtype=torch.float32).reshape(2 * n, 2) + r
    y = on_cuda(hvd.reducescatter(t, op=hvd.Sum, name="rs"))
    full = n * (torch.arange(4 * n, device=dev, dtype=torch.float32).reshape(2 * n, 2)) + n * (n - 1) / 2
    assert torch.equal(y, full[2 * r:2 * r + 2]), y
    return f"rank slice {tuple(y.shape)}"


def grouped_and_fused():
    ts = [torch.full((1000 + k,), float(r + k), device=dev) for k in range(64)]
    out = hvd.grouped_allreduce(ts, op=hvd.Sum, name="grouped")
    for k, o in enumerate(out):
        assert torch.all(on_cuda(o) == sum(q + k for q in range(n)))
    hs = [hvd.allreduce_async_(t, op=hvd.Sum, name=f"async.{k}") for k, t in enumerate(ts)]
    for h in hs:
        hvd.synchronize(h)
    for k, t in enumerate(ts):
        assert torch.all(t == sum(q + k for q in range(n))), f"async tensor {k}"
    return "64-tensor grouped allreduce + 64 async in-place allreduces"


def optimizer_amp():
    """train.py's step: autocast, GradScaler, DistributedOptimizer(fp16), synchronize, unscale_,
    clip, skip_synchronize + scaler.step. Checks the synchronized gradient is the rank mean."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.SiLU(), torch.nn.Conv2d(16, 8, 3, stride=2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4)).to(dev)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    ref = [p.detach().clone() for p in model.parameters()]
    local = copy.deepcopy(model)  # this rank's own gradient, without Horovod
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.fp16)
    # init_scale 1024: 65536 x these gradients can overflow fp16 in the compressed allreduce
    # (GradScaler then skips the step, as it should, but the gradient check below needs values)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(8, 3, 32, 32, device=dev, generator=torch.Generator(device=dev).manual_seed(10 + r))
    with torch.autocast("cuda"):
        local(x).float().square().mean().backward()
    own_flat = torch.cat([p.grad.reshape(-1).float() for p in local.parameters()])
    mean_flat = hvd.allgather(own_flat[None], name="own_grads").mean(0)
    steps_taken = 0
    for step in range(3):
        with torch.autocast("cuda"):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        if step == 0:
            got = torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])
            rel = ((got - mean_flat).norm() / mean_flat.norm()).item()
            assert rel < 1e-2, f"synchronized grad differs from the rank mean: rel err {rel}"
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()  # Horovod 0.28 zero_grad takes no set_to_none
        steps_taken += 1
    moved = sum((p.detach() - q).abs().sum().item() for p, q in zip(model.parameters(), ref))
    assert moved > 0, "parameters did not change (every step skipped by GradScaler?)"
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    allp = hvd.allgather(flat[None], name="params")
    assert torch.equal(allp.min(0).values, allp.max(0).values), "ranks' parameters differ"
    return f"3 AMP steps, grad = rank mean (rel err {rel:.1e}), params identical, scale {scaler.get_scale():g}"


def bandwidth():
    t = torch.ones(1 << 26, device=dev)  # 256 MiB fp32
    for _ in range(3):
        hvd.allreduce_(t, op=hvd.Sum, name="bw")
    torch.cuda.synchronize()
    iters = 10
    t0 = time.perf_counter()
    for _ in range(iters):
        hvd.allreduce_(t, op=hvd.Sum, name="bw")
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    gbs = t.numel() * 4 / dt / 1e9
    return f"256 MiB fp32 allreduce {dt * 1e3:.1f} ms ({gbs:.0f} GB/s algbw) on {n} rank(s)"


if r == 0:
    print(f"ranks={n} nccl_built={hvd.nccl_built()} cuda_built={hvd.cuda_built()} "
          f"gloo={hvd.gloo_enabled()} mpi={hvd.mpi_enabled()} device={torch.cuda.get_device_name()}",
          flush=True)
for name, fn in [("allreduce", allreduce_sum), ("fp16_compression", fp16_compression),
                 ("allgather", allgather), ("broadcast", broadcast),
                 ("reducescatter", reducescatter), ("grouped", grouped_and_fused),
                 ("optimizer_amp", optimizer_amp), ("bandwidth", bandwidth)]:
    check(name, fn)
hvd.join()
if r == 0:
    print(f"checks_passed={ok_count}/{total}", flush=True)
PYEOF

# parse_checks PREFIX LOGFILE: one result row per check.<name>= line
parse_checks() {
  local prefix=$1 file=$2 line name rest status detail found=0
  while IFS= read -r line; do
    found=1
    name=${line%%=*}; name=${name#check.}; rest=${line#*=}
    status=${rest%%:*}; detail=${rest#*: }
    record "$prefix.$name" "$status" "$detail"
  done < <(grep -oE 'check\.[a-z0-9_]+=(ok|FAIL): .*' "$file")
  return $(( found ? 0 : 1 ))
}

if has_stage collectives; then
  say "horovodrun --check-build"
  run_logged check_build 120 horovodrun --check-build
  cb=$WORK/check_build.log
  want_ok=1
  for f in PyTorch Gloo NCCL; do grep -Eq "\[X\] $f\b" "$cb" || want_ok=0; done
  flags=$(grep -E '\[X\]' "$cb" | sed 's/ *\[X\] //' | tr '\n' ',' | sed 's/,$//')
  record check_build "$([ $want_ok = 1 ] && echo ok || echo FAIL)" "[X]: $flags"
  run_logged hvd_yolo_env 120 hvd-yolo env
  record hvd_yolo_env info "exit $? ($(grep -iE 'nccl|cuda' "$WORK/hvd_yolo_env.log" | head -n 3 | tr -s ' \n' ' '))"

  say "collectives on CUDA tensors, 1 rank (plain python)"
  HOROVOD_TIMELINE=$WORK/timeline1.json run_logged coll1 300 "$PY" "$WORK/collectives.py"
  rc=$?
  parse_checks r1 "$WORK/coll1.log" || record r1.collectives FAIL "exit $rc, no check lines: $(tail -n 3 "$WORK/coll1.log" | tr '\n' ' ')"
  if [ -f "$WORK/timeline1.json" ]; then
    ops=$(grep -oE '"NCCL_[A-Z_]+"' "$WORK/timeline1.json" | sort | uniq -c | awk '{printf "%s x%s, ", $2, $1}' | tr -d '"' | sed 's/, $//')
    record r1.timeline_nccl "$([ -n "$ops" ] && echo ok || echo FAIL)" "timeline activities: ${ops:-no NCCL_* activity}"
  fi

  say "collectives on CUDA tensors, 2 ranks sharing one GPU (horovodrun --gloo -np 2)"
  run_logged coll2 240 horovodrun --gloo -np 2 -H localhost:2 "$PY" "$WORK/collectives.py"
  rc=$?
  if ! parse_checks r2 "$WORK/coll2.log"; then
    why=$(grep -m1 -iE 'duplicate gpu|ncclInvalidUsage|NCCL error|error' "$WORK/coll2.log" | cut -c1-300)
    record r2.collectives FAIL "exit $rc: ${why:-$(tail -n 2 "$WORK/coll2.log" | tr '\n' ' ')}"
  fi
  dup=$(grep -m1 -i 'duplicate gpu' "$WORK/coll2.log" | cut -c1-200)
  [ -n "$dup" ] && record r2.nccl_same_gpu info "NCCL refuses 2 ranks on one GPU: $dup"
fi

# ------------------------------------------------------------------------------ train
train_ready() {
  local f missing=""
  for f in hvd_yolo/data/dataset.py hvd_yolo/data/sampler.py hvd_yolo/commands/convert.py hvd_yolo/loop/fixed.py; do
    [ -f "$f" ] || missing+="$f "
  done
  [ -z "$missing" ] || { record train FAIL "not in this tree yet: $missing"; return 1; }
}

# train_run NAME MODEL SIZE BATCH EPOCHS EXTRA_SET...: hvd-yolo train on CUDA under horovodrun -np 1
train_run() {
  local name=$1 model=$2 size=$3 batch=$4 epochs=$5; shift 5
  local run_dir=$WORK/$name cfg=$WORK/$name.yaml
  "$PY" - "$cfg" "$WORK/data" "$run_dir" "$model" "$size" "$batch" "$epochs" <<'PYEOF'
import sys, yaml
cfg, data, run_dir, model, size, batch, epochs = sys.argv[1:]
yaml.safe_dump({
    "data": {"train": f"{data}/shards/train", "val": f"{data}/shards/val", "workers": 4},
    "model": {"name": model}, "input": {"size": int(size)},
    "augment": {"flip": 0.5, "hsv": [0.01, 0.3, 0.3], "mosaic": 0.0},
    "optim": {"name": "adamw", "lr": 0.001, "batch_size": int(batch), "epochs": int(epochs),
              "warmup_steps": 20, "ema": True, "ema_decay": 0.99},
    "dist": {"compression": "fp16", "cuda": True},
    "eval": {"every": 0, "batch_size": 32},
    "run": {"out_dir": run_dir, "seed": 0, "log_every": 5, "progress": False},
}, open(cfg, "w"), sort_keys=False)
PYEOF
  run_logged "$name" 540 horovodrun --gloo -np 1 -H localhost:1 hvd-yolo train --config "$cfg" \
    --set dist.cuda=true "$@"
  local rc=$?
  local figures
  figures=$("$PY" - "$run_dir/metrics.jsonl" <<'PYEOF' 2>&1
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in recs if r["type"] == "step"]
evals = [r for r in recs if r["type"] == "eval"]
assert steps, "no step records"
assert all(math.isfinite(r["loss"]) for r in steps), "non-finite loss"
rates = [r["img_s"] for r in steps[1:]] or [steps[-1]["img_s"]]
s = (f"{steps[-1]['step']} steps, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, "
     f"{max(rates):.0f} img/s peak / {sorted(rates)[len(rates) // 2]:.0f} median (after step {steps[0]['step']})")
if evals:
    s += f", mAP@.5:.95 {evals[-1]['mAP']:.3f} mAP@.5 {evals[-1]['mAP50']:.3f}"
print(s)
PYEOF
)
  local frc=$?
  if [ $rc = 0 ] && [ $frc = 0 ]; then
    record "$name" ok "$figures"
  else
    record "$name" FAIL "exit $rc: $(grep -m1 -E 'Error|error|Traceback' -A0 "$WORK/$name.log" | cut -c1-200) | $(tail -n 2 "$WORK/$name.log" | tr '\n' ' ' | cut -c1-300) | $figures"
  fi
}

if has_stage train && train_ready; then
  say "train: synthetic dataset -> shards -> hvd-yolo train on CUDA"
  run_logged cli_help 60 hvd-yolo --help
  record cli_help "$([ $? = 0 ] && echo ok || echo FAIL)" "hvd-yolo --help"
  n_train=${GPU_CHECK_TRAIN_IMAGES:-256}
  "$PY" -c "
from hvd_yolo.data.synthetic import write_yolo_dataset
write_yolo_dataset('$WORK/data/source/train', $n_train, seed=1000)
write_yolo_dataset('$WORK/data/source/val', 64, seed=2000)" >>"$LOG" 2>&1
  conv_ok=1
  for split in train val; do
    run_logged "convert_$split" 300 hvd-yolo convert yolo "$WORK/data/source/$split" \
      "$WORK/data/shards/$split" --shards 4 || conv_ok=0
  done
  record convert "$([ $conv_ok = 1 ] && echo ok || echo FAIL)" "$n_train train + 64 val synthetic images -> 4 shards each"
  if [ $conv_ok = 1 ]; then
    epochs=${GPU_CHECK_EPOCHS:-3}
    train_run train_tiny yolov3-tiny 416 16 "$epochs" --set eval.every=1
    train_run train_yolov3 yolov3 416 16 1 --set data.val=null
  fi
fi

# ------------------------------------------------------------------------------ bench
if has_stage bench; then
  if [ -f hvd_yolo/bench/train.py ]; then
    say "hvd-yolo bench train"
    # fp32 (the benchmark has no autocast), fixed random batch, real YoloLoss, 80 classes.
    for model in yolov3 yolov3-tiny; do
      for comp in fp16 none; do
        name=bench_${model}_$comp
        # shellcheck disable=SC2086
        run_logged "$name" 300 horovodrun --gloo -np 1 -H localhost:1 hvd-yolo bench train \
          --model "$model" --size 416 --compression "$comp" --device cuda \
          ${GPU_CHECK_BENCH_ARGS:---batch-size 32 --iterations 20 --warmup 3} --quiet --json "$WORK/$name.json"
        rc=$?
        line=$("$PY" - "$WORK/$name.json" <<'PYEOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
wait = r["allreduce_wait_mean_s"]
print(f"{r['img_per_sec_per_rank']:.1f} +- {r['img_per_sec_per_rank_ci95']:.1f} img/s "
      f"(batch {r['batch']}, {r['size']}px, {r['device']}, step {r['step_time_mean_s'] * 1e3:.1f} ms, "
      f"allreduce wait {wait * 1e3 if wait is not None else float('nan'):.1f} ms, "
      f"{r['parameters'] / 1e6:.1f} M params)")
PYEOF
)
        [ $rc = 0 ] || line="exit $rc: $(tail -n 2 "$WORK/$name.log" | tr '\n' ' ' | cut -c1-300) $line"
        record "bench.$model.$comp" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$line"
      done
    done
  else
    record bench skipped "hvd_yolo/bench/train.py is not in this tree yet"
  fi
fi

finish
