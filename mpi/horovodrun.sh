#!/usr/bin/env bash
# Launch hvd-yolo (or any command) on N ranks through `horovodrun`.
#
# Usage: mpi/horovodrun.sh [options] [--] [hvd-yolo arguments...]
#        mpi/horovodrun.sh [options] --exec [--] COMMAND [ARGS...]
#
#   -np N                 number of ranks (default: local cores)
#   -H HOSTS              host:slots list, e.g. node1:4,node2:4 (default localhost:N)
#   --hostfile FILE       hostfile ("host slots=N" lines; see mpi/hostfile.example)
#   --gloo                Gloo controller: no mpirun needed, ranks started over ssh/locally
#   --mpi                 MPI controller (the default): horovodrun builds an mpirun line
#   --iface IF            network interface(s) for the controller and data (comma list)
#   --network NET         between nodes: TCP only on NET, an interface or a subnet (the
#                         interface of this node's address in it); MPI: btl tcp,self
#   --ssh-port PORT       ssh port of the other nodes (e.g. 2222 for the Docker images)
#   --cpu | --gpu         force the CPU-only or GPU settings (default: GPU when nvidia-smi
#                         lists a GPU here; HVD_YOLO_GPU=0|1 does the same)
#   --start-timeout S     seconds for all ranks to start (default horovodrun's, 30)
#   --elastic MIN:MAX     elastic run (Gloo): between MIN and MAX ranks on the hosts that
#                         --hostfile lists at each moment (edit it while the job runs:
#                         mpi/discover_hosts.sh reads it); -np defaults to MIN. One node
#                         only: give --iface lo (else horovodrun waits for a second host)
#   --horovodrun-arg ARG  pass ARG to horovodrun as is (repeat as needed)
#   --no-host-check       skip the check that every host of --hostfile/-H resolves and
#                         answers ssh (it runs first, naming the hostfile line of a bad host)
#   --exec                the arguments are a whole command, not hvd-yolo arguments
#   --dry-run             print the horovodrun command line instead of running it
#   -h, --help            this help
# The first argument that is not one of these options (or everything after `--`) starts the
# hvd-yolo arguments: `mpi/horovodrun.sh -np 4 --gloo train --config cfg.yaml`.
# Environment: HVD_YOLO_BIN (default: hvd-yolo of this checkout's .venv, else on PATH),
# HOROVODRUN (default: horovodrun next to that, else on PATH). horovodrun passes the whole
# environment to the ranks itself.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
die() { printf 'mpi/horovodrun.sh: error: %s\n' "$*" >&2; exit 2; }
# shellcheck source=mpi/common.sh
. "$here/common.sh"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

np="" hostfile="" hosts="" iface="" network="" ssh_port="" gpu=${HVD_YOLO_GPU:-} controller=mpi
exec_mode=0 dry=0 start_timeout="" elastic="" host_check=1
extra=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -np|-n|--np|--num-proc) need "$@"; np=$2; shift 2 ;;
    -H|--hosts) need "$@"; hosts=$2; shift 2 ;;
    --hostfile) need "$@"; hostfile=$2; shift 2 ;;
    --gloo) controller=gloo; shift ;;
    --mpi) controller=mpi; shift ;;
    --iface) need "$@"; iface=$2; shift 2 ;;
    --network) need "$@"; network=$2; shift 2 ;;
    --ssh-port) need "$@"; ssh_port=$2; shift 2 ;;
    --cpu) gpu=0; shift ;;
    --gpu) gpu=1; shift ;;
    --start-timeout) need "$@"; start_timeout=$2; shift 2 ;;
    --elastic) need "$@"; elastic=$2; shift 2 ;;
    --horovodrun-arg) need "$@"; extra+=("$2"); shift 2 ;;
    --no-host-check) host_check=0; shift ;;
    --exec) exec_mode=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [ -n "$elastic" ]; then
  [[ "$elastic" =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]] && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] \
    || die "--elastic must be MIN:MAX with 1 <= MIN <= MAX, got '$elastic'"
  [ -n "$hostfile" ] || die "--elastic needs --hostfile FILE (the hosts to use; edit it while the job runs)"
  controller=gloo min_np=${BASH_REMATCH[1]} max_np=${BASH_REMATCH[2]}
  [ -n "$np" ] || np=$min_np
fi
[ -n "$np" ] || np=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-np must be a positive integer, got '$np'"
[ -z "$hostfile" ] || [ -r "$hostfile" ] || die "hostfile '$hostfile' not found or not readable"
[ -z "$hostfile" ] || [ -z "$hosts" ] || die "give --hostfile or -H, not both"
[ -n "$hostfile" ] || [ -n "$hosts" ] || hosts="localhost:$np"
# The hosts: a malformed line or a host that does not resolve or answer ssh, one line each,
# instead of horovodrun's tracebacks (resolution and ssh are skipped by --dry-run).
if [ -n "$hostfile" ]; then
  host_lines=$(hostfile_hosts "$hostfile" "$([ -n "$elastic" ] && echo 1 || echo 0)")
  where="hostfile '$hostfile' line"
else
  host_lines=$(hostlist_hosts "$hosts")
  where="-H '$hosts' entry"
fi
if [ "$dry" = 0 ] && [ "$host_check" = 1 ]; then
  check_hosts "$where" 1 "$ssh_port" <<< "$host_lines"
fi

HOROVODRUN=${HOROVODRUN:-}
if [ -z "$HOROVODRUN" ]; then
  if [ -x "$root/.venv/bin/horovodrun" ]; then HOROVODRUN=$root/.venv/bin/horovodrun
  else HOROVODRUN=$(command -v horovodrun || true); fi
fi
[ -n "$HOROVODRUN" ] && [ -x "$HOROVODRUN" ] \
  || die "horovodrun not found: run scripts/install.sh (Horovod into .venv) or set HOROVODRUN"
if [ "$controller" = mpi ] && ! command -v mpirun >/dev/null 2>&1; then
  die "mpirun not found for the MPI controller: install Open MPI or use --gloo"
fi

resolve_command "$root" "$exec_mode" "$@"
[ -n "$gpu" ] || gpu=$(detect_gpu)
# A subnet names no interface: Gloo needs this node's interface with an address in it.
if [ -n "$network" ] && [ -z "$iface" ]; then
  if [[ "$network" == */* ]]; then
    iface=$(subnet_iface "$network")
    [ -n "$iface" ] || die "no interface of this node has an address in $network"
  else iface=$network; fi
fi

argv=("$HOROVODRUN" -np "$np")
[ -n "$hosts" ] && argv+=(-H "$hosts")
if [ -n "$elastic" ]; then  # the hostfile is read anew by the discovery script
  HVD_YOLO_HOSTFILE=$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")
  export HVD_YOLO_HOSTFILE
  argv+=(--min-np "$min_np" --max-np "$max_np" --host-discovery-script "$here/discover_hosts.sh")
elif [ -n "$hostfile" ]; then argv+=(--hostfile "$hostfile"); fi
argv+=("--$controller")
[ -n "$iface" ] && argv+=(--network-interfaces "$iface")
[ -n "$ssh_port" ] && argv+=(--ssh-port "$ssh_port")
[ -n "$start_timeout" ] && argv+=(--start-timeout "$start_timeout")
if [ "$controller" = mpi ]; then
  mpi_args=""
  # CPU-only: Open MPI otherwise busy-polls while a rank waits, stealing the cores.
  [ "$gpu" = 0 ] && mpi_args="--mca mpi_yield_when_idle 1"
  # More local ranks than cores (a laptop, CI): allow oversubscription.
  if [ -z "$hostfile" ] && [ "$hosts" = "localhost:$np" ] && [ "$np" -gt "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" ]; then
    mpi_args="$mpi_args --oversubscribe"
  fi
  [ -n "$network" ] && mpi_args="$mpi_args --mca btl tcp,self"
  # Open MPI's TCP settings that let both directions of a pair use the link (launch.TCP_MCA)
  tcp_mca=$("$(package_python "$root")" "$root/hvd_yolo/launch.py" tcp-mca) \
    || die "could not read TCP_MCA from $root/hvd_yolo/launch.py"
  [ -n "$tcp_mca" ] && mpi_args="$mpi_args $tcp_mca"
  [ -n "$iface" ] && mpi_args="$mpi_args --mca btl_tcp_if_include $iface --mca oob_tcp_if_include $iface"
  [ -n "$mpi_args" ] && argv+=(--mpi-args="${mpi_args# }")
fi
if [ -n "$iface" ]; then
  export NCCL_SOCKET_IFNAME=$iface HOROVOD_GLOO_IFACE=$iface
fi
argv+=(${extra[@]+"${extra[@]}"})
argv+=("${cmd[@]}")

if [ "$dry" = 1 ]; then
  printf '%q ' "${argv[@]}"; printf '\n'
  exit 0
fi
export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}  # NFS/Lustre: no HDF5 flock
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
exec "${argv[@]}"
