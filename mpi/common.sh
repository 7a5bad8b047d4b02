# Shared by mpi/mpirun.sh and mpi/horovodrun.sh (sourced, not run; uses the caller's `die`).

# resolve_command ROOT EXEC_MODE ARGS...: set the array `cmd` to what every rank runs. With
# --exec (EXEC_MODE=1) that is ARGS; otherwise hvd-yolo (HVD_YOLO_BIN, ROOT/.venv, then PATH)
# followed by ARGS.
resolve_command() {
  local root=$1 exec_mode=$2 bin
  shift 2
  if [ "$exec_mode" = 1 ]; then
    [ $# -gt 0 ] || die "--exec needs a command"
    cmd=("$@")
    return
  fi
  bin=${HVD_YOLO_BIN:-}
  if [ -z "$bin" ]; then
    if [ -x "$root/.venv/bin/hvd-yolo" ]; then bin=$root/.venv/bin/hvd-yolo
    else bin=$(command -v hvd-yolo || true); fi
  fi
  [ -n "$bin" ] || die "hvd-yolo not found: run scripts/install.sh (or set HVD_YOLO_BIN, or use --exec)"
  [ $# -gt 0 ] || die "no hvd-yolo arguments given (e.g. train --config cfg.yaml); see --help"
  cmd=("$bin" "$@")
}

# detect_gpu: print 1 when nvidia-smi lists a GPU on this node, else 0.
detect_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo 1
  else
    echo 0
  fi
}

# package_python ROOT: the Python that has hvd_yolo (HVD_YOLO_PYTHON, ROOT/.venv, python3).
package_python() {
  local py=${HVD_YOLO_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$1/.venv/bin/python" ]; then py=$1/.venv/bin/python
    else py=$(command -v python3 || true); fi
  fi
  [ -n "$py" ] || die "python3 not found: run scripts/install.sh (or set HVD_YOLO_PYTHON)"
  printf '%s\n' "$py"
}

# subnet_iface CIDR: the name of this node's interface with an IPv4 address inside CIDR.
subnet_iface() {
  local py
  py=$(package_python "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)")
  ip -o -4 addr show | "$py" -c '
import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1], strict=False)
for line in sys.stdin:
    f = line.split()
    if ipaddress.ip_interface(f[3]).ip in net:
        print(f[1]); break' "$1"
}
