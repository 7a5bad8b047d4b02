# Shared by mpi/slurm/train.sbatch and mpi/slurm/convert.sbatch (sourced, not run).
# Sets up the environment inside a Slurm allocation and launches one command on every task,
# with srun or with mpirun (mpi/mpirun.sh), forwarding a time-limit warning as SIGTERM.
#
# Variables (all optional; export them before sbatch, or edit the batch script):
#   HVD_YOLO_HOME         the hvd_yolo checkout (default: the directory sbatch was run from)
#   HVD_YOLO_SETUP        a file to source first (module load ..., conda activate ...)
#   HVD_YOLO_VENV         virtualenv to activate (default $HVD_YOLO_HOME/.venv; "none": skip)
#   HVD_YOLO_LAUNCHER     mpirun (default; works wherever Open MPI runs) | srun
#   HVD_YOLO_SRUN_MPI     srun's --mpi plugin (default pmix; pmi2 on older stacks)
#   HVD_YOLO_CPU_BIND     none (default, Horovod's advice) | cores (bind each task to
#                         --cpus-per-task cores)
#   HVD_YOLO_IFACE        network interface for MPI/Gloo/NCCL traffic (e.g. ib0, eth0)
#   HVD_YOLO_LOG_DIR      per-job log folder (default ./logs/<name>-<jobid> in the job's
#                         working directory: sbatch -D DIR, else where sbatch ran)
#   HVD_YOLO_MAX_RESTARTS requeue at most this many times (default 20)
#   HVD_YOLO_REQUEUE      1 (default): requeue after the time-limit warning; 0: just stop
#   HVD_YOLO_CONTAINER    an Apptainer/Singularity image (.sif) to run each task in
#   HVD_YOLO_GPU          0|1: force the CPU-only or GPU settings (default: GPU if one is seen)
# shellcheck shell=bash

hvd_yolo_log() { printf '[%(%F %T)T hvd-yolo-slurm] %s\n' -1 "$*"; }
hvd_yolo_die() { printf '[hvd-yolo-slurm] error: %s\n' "$*" >&2; exit 2; }

# Activate the environment and create the log folder. Sets HVD_YOLO_LOG_DIR.
hvd_yolo_setup() {
  [ -n "${SLURM_JOB_ID:-}" ] || hvd_yolo_die "not inside a Slurm job: submit with sbatch"
  HVD_YOLO_HOME=${HVD_YOLO_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ -n "${HVD_YOLO_SETUP:-}" ]; then
    [ -r "$HVD_YOLO_SETUP" ] || hvd_yolo_die "HVD_YOLO_SETUP=$HVD_YOLO_SETUP is not a readable file"
    # shellcheck disable=SC1090
    source "$HVD_YOLO_SETUP"
  fi
  local venv=${HVD_YOLO_VENV:-$HVD_YOLO_HOME/.venv}
  if [ "$venv" != none ]; then
    [ -r "$venv/bin/activate" ] || hvd_yolo_die "no virtualenv at $venv: run scripts/install.sh in $HVD_YOLO_HOME, set HVD_YOLO_HOME to the checkout, or HVD_YOLO_VENV=none to use the PATH as it is"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
  export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}  # NFS/Lustre: no HDF5 flock
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  if [ -n "${HVD_YOLO_IFACE:-}" ]; then
    export NCCL_SOCKET_IFNAME=$HVD_YOLO_IFACE HOROVOD_GLOO_IFACE=$HVD_YOLO_IFACE
    export OMPI_MCA_btl_tcp_if_include=$HVD_YOLO_IFACE OMPI_MCA_oob_tcp_if_include=$HVD_YOLO_IFACE
  fi
  HVD_YOLO_LOG_DIR=${HVD_YOLO_LOG_DIR:-$PWD/logs/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID}
  mkdir -p "$HVD_YOLO_LOG_DIR" || hvd_yolo_die "cannot create log folder $HVD_YOLO_LOG_DIR"
  export HVD_YOLO_LOG_DIR
  {
    echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
         "at $(date -Is): ${SLURM_NTASKS:-?} tasks, ${SLURM_CPUS_PER_TASK:-1} cpus/task"
    echo "launcher=${HVD_YOLO_LAUNCHER:-mpirun} venv=$venv home=$HVD_YOLO_HOME"
  } >> "$HVD_YOLO_LOG_DIR/job.txt"
}

# The launch line for "$@" on every task of the allocation, in the array HVD_YOLO_ARGV.
hvd_yolo_launch_line() {
  local launcher=${HVD_YOLO_LAUNCHER:-mpirun} ntasks=${SLURM_NTASKS:-1}
  local cpt=${SLURM_CPUS_PER_TASK:-1} bind=${HVD_YOLO_CPU_BIND:-none} wrap=()
  if [ -n "${HVD_YOLO_CONTAINER:-}" ]; then
    local rt
    rt=$(command -v apptainer || command -v singularity || true)
    [ -n "$rt" ] || hvd_yolo_die "HVD_YOLO_CONTAINER is set but neither apptainer nor singularity is on PATH"
    wrap=("$rt" exec --bind "$HVD_YOLO_HOME")
    [ "${HVD_YOLO_GPU:-}" = 1 ] && wrap+=(--nv)
    wrap+=("$HVD_YOLO_CONTAINER")
  fi
  case "$launcher" in
    mpirun)
      local script=$HVD_YOLO_HOME/mpi/mpirun.sh
      [ -x "$script" ] || hvd_yolo_die "$script not found: set HVD_YOLO_HOME to the hvd_yolo checkout"
      HVD_YOLO_ARGV=("$script" -np "$ntasks" --mpirun-arg --tag-output)
      [ "$bind" = cores ] && HVD_YOLO_ARGV+=(--cpus-per-rank "$cpt")
      [ -n "${HVD_YOLO_IFACE:-}" ] && HVD_YOLO_ARGV+=(--iface "$HVD_YOLO_IFACE")
      HVD_YOLO_ARGV+=(--exec -- ${wrap[@]+"${wrap[@]}"} "$@") ;;
    srun)
      local cb=none
      [ "$bind" = cores ] && cb=cores
      HVD_YOLO_ARGV=(srun --mpi="${HVD_YOLO_SRUN_MPI:-pmix}" --ntasks="$ntasks"
                     --cpus-per-task="$cpt" --cpu-bind="$cb" --kill-on-bad-exit=1 --label
                     ${wrap[@]+"${wrap[@]}"} "$@") ;;
    *) hvd_yolo_die "HVD_YOLO_LAUNCHER must be mpirun or srun, got '$launcher'" ;;
  esac
}

# Run "$@" on every task. On SIGUSR1 (sent by `#SBATCH --signal=B:USR1@120` before the time
# limit) ask every rank to checkpoint and stop, then requeue the job (it resumes from its
# checkpoint with --resume auto). On SIGTERM (scancel, preemption) ask the same but do not
# requeue: a cancelled job stays cancelled. Returns the job step's exit code.
# How the ranks are asked (hvd-yolo train treats SIGTERM and SIGUSR1 alike):
#   srun:   SIGTERM to srun, which delivers it to every task of the step;
#   mpirun: SIGUSR1 to mpirun, which relays it at once to every rank on every node. (SIGTERM
#           would make mpirun abort the job: SIGCONT, a pause, SIGTERM, a pause, SIGKILL.)
hvd_yolo_run() {
  hvd_yolo_launch_line "$@"
  hvd_yolo_log "launching: ${HVD_YOLO_ARGV[*]}" | tee -a "$HVD_YOLO_LOG_DIR/job.txt"
  HVD_YOLO_REQUEUE_WANTED=0
  trap '_hvd_yolo_on_signal USR1' USR1
  trap '_hvd_yolo_on_signal TERM' TERM
  "${HVD_YOLO_ARGV[@]}" > >(tee -a "$HVD_YOLO_LOG_DIR/train.log") 2>&1 &
  HVD_YOLO_STEP_PID=$!
  local rc=0
  while :; do
    wait "$HVD_YOLO_STEP_PID" && rc=0 || rc=$?
    # wait returns > 128 when a trapped signal interrupted it: keep waiting for the step.
    kill -0 "$HVD_YOLO_STEP_PID" 2>/dev/null || break
  done
  trap - USR1 TERM
  hvd_yolo_log "job step exited with code $rc" | tee -a "$HVD_YOLO_LOG_DIR/job.txt"
  if [ "$HVD_YOLO_REQUEUE_WANTED" = 1 ] && [ "${HVD_YOLO_REQUEUE:-1}" = 1 ]; then
    local restarts=${SLURM_RESTART_COUNT:-0} max=${HVD_YOLO_MAX_RESTARTS:-20}
    if [ "$restarts" -ge "$max" ]; then
      hvd_yolo_log "not requeueing: restarted $restarts times (HVD_YOLO_MAX_RESTARTS=$max)"
    else
      hvd_yolo_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))" \
        | tee -a "$HVD_YOLO_LOG_DIR/job.txt"
      scontrol requeue "$SLURM_JOB_ID" || hvd_yolo_log "scontrol requeue failed"
    fi
  fi
  return "$rc"
}

_hvd_yolo_on_signal() {
  local sig=TERM
  [ "${HVD_YOLO_LAUNCHER:-mpirun}" = mpirun ] && sig=USR1
  hvd_yolo_log "got SIG$1: sending SIG$sig to the job step (pid $HVD_YOLO_STEP_PID) so every rank checkpoints and stops" \
    | tee -a "$HVD_YOLO_LOG_DIR/job.txt"
  [ "$1" = USR1 ] && HVD_YOLO_REQUEUE_WANTED=1
  kill -"$sig" "$HVD_YOLO_STEP_PID" 2>/dev/null || true
}
