#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile) with a real engine and run a 2-rank smoke inside it:
# `hvd-yolo env`, then `hvd-yolo demo` on a tiny synthetic dataset (mpirun -np 2 convert,
# mpirun -np 2 train, distributed evaluation), with no network in the container.
#
# Usage: docker/check.sh            (what `make docker-check` runs, from the checkout's root)
# Environment:
#   DOCKER           docker client (default: the first one on PATH that can build with BuildKit;
#                    a client >= 23 needs the buildx plugin, an older one has BuildKit built in)
#   IMAGE            tag to build (default hvd-yolo:cpu)
#   BASE_IMAGE       base image (default debian:bookworm-slim, as in the Dockerfile). With
#                    BASE_IMAGE=debootstrap, or when that image cannot be pulled, the base is
#                    made from the Debian archive instead (root + debootstrap)
#   TORCH_INDEX_URL  where torch/torchvision come from (default: the Dockerfile's CPU wheel
#                    index; when it is unreachable, https://pypi.org/simple: PyPI's CUDA
#                    wheels, which run on CPU; Horovod is then built for CPU all the same)
#   PIP_CERT         CA bundle for pip (as pip reads it): handed to the build as the pip_cert
#                    secret, for a TLS-intercepting proxy
#   BUILD_ARGS       more `docker build` arguments
#   CHECK_ONLY=1     skip the build: run the checks on the existing IMAGE
# Exit status: 0 built and passed; 1 a step failed; 77 no engine can run here (the reason is
# printed on stderr, starting with "no container engine:").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
IMAGE=${IMAGE:-hvd-yolo:cpu}
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
say() { printf '[docker-check] %s\n' "$*"; }
fail() { printf '[docker-check] FAILED: %s\n' "$*" >&2; exit 1; }
no_engine() { printf 'no container engine: %s\n' "$*" >&2; exit 77; }

# ---------------------------------------------------------------- the engine
buildkit_client() {  # $1 works for a BuildKit build: buildx present, or a client < 23
  local major
  "$1" buildx version >/dev/null 2>&1 && return 0
  # (`docker version` fails without a daemon but still prints the client's version)
  major=$("$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]
}
if [ -z "${DOCKER:-}" ]; then
  for c in $(type -ap docker) /usr/bin/docker; do
    [ -x "$c" ] && buildkit_client "$c" && { DOCKER=$c; break; }
  done
  [ -n "${DOCKER:-}" ] || {
    command -v docker >/dev/null 2>&1 || no_engine "no docker client on PATH (Debian: apt-get install docker.io)"
    no_engine "docker $(docker version --format '{{.Client.Version}}' 2>/dev/null) needs the buildx plugin for BuildKit (the Dockerfile uses RUN --mount), and no older client was found"
  }
fi
if ! info=$("$DOCKER" info --format '{{.ServerVersion}}' 2>/dev/null); then
  why=$("$DOCKER" info 2>&1 | grep -m 1 -iE 'cannot connect|denied|error' || true)
  no_engine "'$DOCKER info' failed: ${why:-no answer} (start dockerd, e.g. 'dockerd --iptables=false --bridge=none &')"
fi
say "engine: $DOCKER (client $("$DOCKER" version --format '{{.Client.Version}}'), server $info)"
export DOCKER_BUILDKIT=1

# Containers, network and folders of this check, removed however it ends.
work=$(mktemp -d /tmp/hvd-yolo-docker-check.XXXXXX)
net=""
cleanup() {
  local c
  for c in $("$DOCKER" ps -aq --filter "label=hvd-yolo-check=$$" 2>/dev/null); do
    "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true
  done
  [ -z "$net" ] || "$DOCKER" network rm "$net" >/dev/null 2>&1 || true
  rm -rf "$work" "${rootfs:-}"
}
trap cleanup EXIT

# ---------------------------------------------------------------- the base image
base_image() {  # BASE_IMAGE, pulled, or made with debootstrap when asked or not pullable
  if [ "$BASE_IMAGE" = debian:bookworm-slim ] && ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
      && ! "$DOCKER" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "cannot pull $BASE_IMAGE (no Docker Hub from here): making the base from the Debian archive"
    BASE_IMAGE=debootstrap
  fi
  [ "$BASE_IMAGE" = debootstrap ] || return 0
  BASE_IMAGE=hvd-yolo-base:bookworm
  "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null 2>&1 || fail "BASE_IMAGE=debootstrap needs debootstrap (apt-get install debootstrap)"
  rootfs=$(mktemp -d /tmp/hvd-yolo-rootfs.XXXXXX)
  say "making $BASE_IMAGE with debootstrap (Debian bookworm, minbase)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null \
    || fail "debootstrap failed"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  rootfs=""
}

# ---------------------------------------------------------------- build
build() {
  local index args start
  if [ -z "${TORCH_INDEX_URL:-}" ]; then
    index=$(sed -n 's/^ARG TORCH_INDEX_URL=//p' docker/Dockerfile)
    if ! curl -fsS -o /dev/null --max-time 20 "$index/torch/" 2>/dev/null; then
      say "$index unreachable from here: torch from PyPI instead (its CUDA build; runs on CPU)"
      TORCH_INDEX_URL=https://pypi.org/simple
    fi
  fi
  args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  # pip inside the build trusts what pip here trusts (a TLS-intercepting proxy's CA bundle).
  [ -n "${PIP_CERT:-}" ] && [ -r "$PIP_CERT" ] && args+=(--secret "id=pip_cert,src=$PIP_CERT")
  # shellcheck disable=SC2206  # BUILD_ARGS is a list of words on purpose
  [ -n "${BUILD_ARGS:-}" ] && args+=(${BUILD_ARGS})
  say "building $IMAGE from docker/Dockerfile (base $BASE_IMAGE)"
  start=$(date +%s)
  "$DOCKER" build --progress=plain --network host -f docker/Dockerfile "${args[@]}" -t "$IMAGE" . \
    || fail "docker build failed (output above)"
  say "built $IMAGE in $(( $(date +%s) - start )) s; size $("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
}

if [ "${CHECK_ONLY:-0}" = 1 ]; then
  "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || fail "CHECK_ONLY=1 but there is no image $IMAGE"
  say "CHECK_ONLY=1: checking the existing $IMAGE (not rebuilt)"
else
  base_image
  build
fi

# ---------------------------------------------------------------- smoke: 2 ranks inside it
run=("$DOCKER" run --rm --label "hvd-yolo-check=$$" --shm-size=1g -e OMP_NUM_THREADS=1)
say "hvd-yolo env inside the image"
"${run[@]}" --network none "$IMAGE" env || fail "hvd-yolo env failed inside $IMAGE"
say "2-rank demo inside the image (convert, train, evaluate under mpirun -np 2)"
start=$(date +%s)
out=$("${run[@]}" --network none -v "$work/data:/data" "$IMAGE" demo --np 2 --train-images 16 \
      --val-images 8 --epochs 1 --size 64 --batch-size 4 --out /data/demo 2>&1) \
  || { printf '%s\n' "$out"; fail "2-rank demo failed inside $IMAGE"; }
printf '%s\n' "$out" | tail -n 15
printf '%s\n' "$out" | grep -q 'mAP' || fail "the demo printed no mAP"
say "2-rank demo passed in $(( $(date +%s) - start )) s"

# ---------------------------------------------------------------- the MPIJob's shape
# docker/k8s/mpijob.yaml with containers: two worker containers run the image's sshd with the
# keys mounted read-only at /root/.ssh (as the MPI Operator mounts them), a launcher container
# runs the package's launch line over ssh with the operator's hostfile layout; the shards and
# run.out_dir are shared folders (the claims). Then the launcher runs again, as after a
# requeue, and must resume from the checkpoint.
say "MPIJob rehearsal: launcher + 2 worker containers, mpirun over ssh"
start=$(date +%s)
net=hvd-yolo-check-$$
subnet=${CHECK_SUBNET:-198.19.251.0/24}
"$DOCKER" network create --subnet "$subnet" "$net" >/dev/null || fail "docker network create $subnet failed"
prefix=${subnet%.*}
mkdir -p "$work/ssh" "$work/runs" "$work/etc-mpi"
ssh-keygen -q -t ecdsa -b 521 -N '' -f "$work/ssh/id_rsa" || fail "ssh-keygen failed"
cp "$work/ssh/id_rsa.pub" "$work/ssh/authorized_keys"
chmod 0700 "$work/ssh" && chmod 0600 "$work/ssh/"*
hosts=() hostfile=""
for i in 0 1; do
  hosts+=(--add-host "hvd-yolo-worker-$i.hvd-yolo:$prefix.1$i")
  hostfile+="hvd-yolo-worker-$i.hvd-yolo slots=1"$'\n'
done
printf '%s' "$hostfile" > "$work/etc-mpi/hostfile"
for i in 0 1; do
  "$DOCKER" run -d --label "hvd-yolo-check=$$" --name "$net-worker-$i" --network "$net" \
    --ip "$prefix.1$i" --hostname "hvd-yolo-worker-$i.hvd-yolo" "${hosts[@]}" --shm-size=1g \
    -v "$work/ssh:/root/.ssh:ro" -v "$work/data:/data:ro" -v "$work/runs:/runs" \
    "$IMAGE" sshd >/dev/null || fail "worker container $i did not start"
done
launch=(mpi/mpirun.sh --hostfile /etc/mpi/hostfile -np 2 --cpu --term-grace 60
        train --config /data/demo/demo.yaml --set run.out_dir=/runs/hvd-yolo
        --set run.progress=false --set data.workers=0 --set optim.epochs=2 --resume auto)
# The operator's launcher environment: full worker names (Open MPI would shorten them to names
# the other pods cannot resolve), its hostfile, retried ssh connections.
launcher=("${run[@]}" --network "$net" --ip "$prefix.2" "${hosts[@]}" -e OMP_NUM_THREADS=1
          -e OMPI_MCA_orte_keep_fqdn_hostnames=true -e OMPI_MCA_orte_default_hostfile=/etc/mpi/hostfile
          -e "OMPI_MCA_plm_rsh_args=-o ConnectionAttempts=10"
          -v "$work/ssh:/root/.ssh:ro" -v "$work/etc-mpi:/etc/mpi:ro" "$IMAGE" exec)
sleep 2
for attempt in first requeued; do
  extra=()
  [ "$attempt" = first ] && extra=(--set run.max_steps=2)  # ends early, like a lost pod
  out=$("${launcher[@]}" "${launch[@]}" "${extra[@]}" 2>&1) \
    || { printf '%s\n' "$out"; "$DOCKER" logs "$net-worker-0" 2>&1 | tail -5; fail "MPIJob rehearsal: the $attempt launcher failed"; }
  printf '%s\n' "$out" | grep -E '^(training|resumed|epoch)' || true
  printf '%s\n' "$out" | grep -q 'on 2 rank' || fail "the $attempt launcher did not train on 2 ranks"
done
printf '%s\n' "$out" | grep -q '^resumed from /runs/hvd-yolo/checkpoints/' \
  || fail "the requeued launcher did not resume from the checkpoint"
for i in 0 1; do
  [ -s "$work/runs/hvd-yolo/ranks/rank$i.jsonl" ] || fail "rank $i left no log on the runs volume"
done
say "MPIJob rehearsal passed in $(( $(date +%s) - start )) s: 2 ranks on 2 worker containers over ssh, the requeue resumed"
say "OK"
