#!/usr/bin/env bash
# Launch hvd-yolo (or any command) on N ranks with the Open MPI line recommended for Horovod.
#
# Usage: mpi/mpirun.sh [options] [--] [hvd-yolo arguments...]
#        mpi/mpirun.sh [options] --exec [--] COMMAND [ARGS...]
#
#   -np N                 number of ranks (default: the slots of the hostfile, else local cores)
#   --hostfile FILE       Open MPI hostfile ("host slots=N" lines; see mpi/hostfile.example)
#   -H HOSTS              host list, e.g. node1:4,node2:4
#   --cpus-per-rank N     bind each rank to N cores (-map-by slot:PE=N -bind-to core)
#                         instead of Horovod's default -bind-to none -map-by slot
#   --network NET         between nodes: TCP only (btl tcp,self, no shared memory) on NET, a
#                         subnet (198.18.0.0/24) or an interface (also for Gloo and NCCL)
#   --iface IF            network interface for MPI, Gloo and NCCL (e.g. eth0, ib0)
#   --ssh-port PORT       ssh port of the other nodes (e.g. 2222 for the Docker images)
#   --cpu | --gpu         force the CPU-only or GPU settings (default: GPU when nvidia-smi
#                         lists a GPU here; HVD_YOLO_GPU=0|1 does the same)
#   --term-grace SECONDS  on SIGTERM/SIGINT, the ranks get SIGUSR1 at once (each checkpoints
#                         at its next step boundary and exits 0) and this long to stop
#                         before mpirun signals them itself (default 30; also mpirun's own
#                         SIGTERM-to-SIGKILL delay when given; HVD_YOLO_TERM_GRACE)
#   --mpirun-arg ARG      pass ARG to mpirun as is (repeat as needed)
#   --no-host-check       skip the check that every host of --hostfile/-H resolves (it
#                         runs before mpirun, naming the hostfile line of a bad host)
#   --exec                the arguments are a whole command, not hvd-yolo arguments
#   --dry-run             print the mpirun command line instead of running it
#   -h, --help            this help
# The first argument that is not one of these options (or everything after `--`) starts the
# hvd-yolo arguments: `mpi/mpirun.sh -np 4 train --config cfg.yaml`.
# Environment: HVD_YOLO_BIN (default: hvd-yolo next to this checkout's .venv, else on PATH),
# MPIRUN (default mpirun). The ranks get PATH and every set HOROVOD_*, NCCL_*, HVD_YOLO_*,
# TORCH_* variable plus the few others listed in mpi/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
die() { printf 'mpi/mpirun.sh: error: %s\n' "$*" >&2; exit 2; }
# shellcheck source=mpi/common.sh
. "$here/common.sh"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

np="" pe="" hostfile="" hosts="" network="" iface="" ssh_port="" gpu=${HVD_YOLO_GPU:-} exec_mode=0 dry=0
grace=${HVD_YOLO_TERM_GRACE:-} host_check=1
extra=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -np|-n|--np) need "$@"; np=$2; shift 2 ;;
    --hostfile|-hostfile|--machinefile) need "$@"; hostfile=$2; shift 2 ;;
    -H|--host) need "$@"; hosts=$2; shift 2 ;;
    --cpus-per-rank) need "$@"; pe=$2; shift 2 ;;
    --network) need "$@"; network=$2; shift 2 ;;
    --iface) need "$@"; iface=$2; shift 2 ;;
    --ssh-port) need "$@"; ssh_port=$2; shift 2 ;;
    --cpu) gpu=0; shift ;;
    --gpu) gpu=1; shift ;;
    --term-grace) need "$@"; grace=$2; shift 2 ;;
    --mpirun-arg) need "$@"; extra+=("$2"); shift 2 ;;
    --no-host-check) host_check=0; shift ;;
    --exec) exec_mode=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

[ -z "$np" ] || [[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-np must be a positive integer, got '$np'"
[ -z "$pe" ] || [[ "$pe" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-rank must be a positive integer, got '$pe'"
[ -z "$grace" ] || [[ "$grace" =~ ^[0-9]+$ ]] || die "--term-grace must be whole seconds, got '$grace'"
[ -z "$hostfile" ] || [ -r "$hostfile" ] || die "hostfile '$hostfile' not found or not readable"
[ -z "$hostfile" ] || [ -z "$hosts" ] || die "give --hostfile or -H, not both"
# The hosts: a malformed hostfile line or an unknown host named here, one line each, instead of
# Open MPI's "internal error" or its daemon banner (resolution is skipped by --dry-run).
if [ -n "$hostfile" ]; then
  host_lines=$(hostfile_hosts "$hostfile" 0)
  where="hostfile '$hostfile' line"
elif [ -n "$hosts" ]; then
  host_lines=$(hostlist_hosts "$hosts")
  where="-H '$hosts' entry"
fi
if [ "$dry" = 0 ] && [ "$host_check" = 1 ] && [ -n "${host_lines:-}" ]; then
  check_hosts "$where" 0 "$ssh_port" <<< "$host_lines"
fi
MPIRUN=${MPIRUN:-mpirun}
command -v "$MPIRUN" >/dev/null 2>&1 \
  || die "'$MPIRUN' not found: install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; on a cluster: module load openmpi) or run scripts/install.sh"

resolve_command "$root" "$exec_mode" "$@"
[ -n "$gpu" ] || gpu=$(detect_gpu)

# The line itself comes from the package (hvd_yolo.launch.mpirun_argv): one definition for
# this script, the demo and the tests.
line=(--gpu "$gpu")
[ -n "$np" ] && line+=(--np "$np")
[ -n "$hostfile" ] && line+=(--hostfile "$hostfile")
[ -n "$hosts" ] && line+=(--hosts "$hosts")
[ -n "$pe" ] && line+=(--cpus-per-rank "$pe")
[ -n "$network" ] && line+=(--network "$network")
[ -n "$iface" ] && line+=(--iface "$iface")
[ -n "$ssh_port" ] && line+=(--ssh-port "$ssh_port")
[ -n "$grace" ] && line+=(--term-grace "$grace")
for arg in ${extra[@]+"${extra[@]}"}; do line+=("--extra=$arg"); done
# Gloo and NCCL take an interface name (a subnet is for MPI only).
gloo_if=$iface
[ -z "$gloo_if" ] && [ -n "$network" ] && [[ "$network" != */* ]] && gloo_if=$network
[ -n "$gloo_if" ] && export NCCL_SOCKET_IFNAME=$gloo_if HOROVOD_GLOO_IFACE=$gloo_if
export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}  # NFS/Lustre: no HDF5 flock
# The ranks know a stop signal reaches them in time (hvd_yolo.sigterm); exported with -x.
export HVD_YOLO_LAUNCH=mpirun.sh
py=$(package_python "$root")
argv=()
# launch.py imports only the standard library: run as a file, it needs no installed package.
mapfile -d '' argv < <(MPIRUN=$MPIRUN "$py" "$root/hvd_yolo/launch.py" mpirun-line "${line[@]}" \
  -- "${cmd[@]}")
[ ${#argv[@]} -gt 0 ] || die "could not build the mpirun line with $py $root/hvd_yolo/launch.py"

if [ "$dry" = 1 ]; then
  printf '%q ' "${argv[@]}"; printf '\n'
  exit 0
fi
# A stop signal (SIGTERM from a scheduler or kill, SIGINT, SIGUSR1) reaches the ranks as SIGUSR1, which
# mpirun passes on at once; mpirun's own SIGTERM handling would send them only SIGCONT and
# their SIGTERM --term-grace seconds later (measured: Open MPI 4.1), so they would train on
# meanwhile. mpirun itself is signalled only if they have not stopped after the grace period.
wait_s=${grace:-30}
stopping=0 killer=""
# shellcheck disable=SC2329  # invoked by the traps below
stop_ranks() {
  if [ "$exec_mode" = 1 ]; then  # --exec: any command; the signal goes to mpirun as is
    kill -"${1#SIG}" "$child" 2>/dev/null || true
    return 0
  fi
  [ "$stopping" = 0 ] || return 0
  stopping=1
  printf 'mpi/mpirun.sh: %s: every rank checkpoints at its next step and stops (SIGUSR1; mpirun is signalled after %s s)\n' "$1" "$wait_s" >&2
  kill -USR1 "$child" 2>/dev/null || true
  # (its own stdio: a reader of this script's output does not wait for the timer)
  ( trap 'kill "$timer" 2>/dev/null; exit 0' TERM
    sleep "$wait_s" & timer=$!
    wait "$timer" && kill -TERM "$child" 2>/dev/null ) </dev/null >/dev/null 2>&1 &
  killer=$!
}
child=""
trap '[ -n "$child" ] || exit 143; stop_ranks SIGTERM' TERM
trap '[ -n "$child" ] || exit 130; stop_ranks SIGINT' INT
trap '[ -n "$child" ] || exit 138; stop_ranks SIGUSR1' USR1  # Slurm's warning (mpi/slurm/common.sh)
"${argv[@]}" &
child=$!
rc=0
while :; do
  if wait "$child"; then rc=0; else rc=$?; fi
  kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: wait again
done
[ -z "$killer" ] || kill "$killer" 2>/dev/null || true
exit "$rc"
