#!/bin/bash
# Entry point of the hvd_yolo images.
#   <image> COMMAND [ARGS]   hvd-yolo COMMAND ARGS (train, eval, convert, env, demo, ...)
#   <image> sshd             run sshd on port ${SSH_PORT:-2222} in the foreground: a worker
#                            node for multi-node mpirun/horovodrun (see docker/README.md)
#   <image> exec CMD [ARGS]  run any command (mpi/mpirun.sh ..., bash, python ...)
# Keys: mount the public key(s) at /root/.ssh/authorized_keys (workers) and the private key at
# /root/.ssh/id_ed25519 (launcher), or pass SSH_AUTHORIZED_KEYS="ssh-ed25519 AAAA..." .
set -euo pipefail

setup_ssh() {
  mkdir -p /root/.ssh /run/sshd
  chmod 0700 /root/.ssh 2>/dev/null || true  # read-only where Kubernetes mounts the keys
  if [ -n "${SSH_AUTHORIZED_KEYS:-}" ]; then
    printf '%s\n' "$SSH_AUTHORIZED_KEYS" >> /root/.ssh/authorized_keys
    chmod 0600 /root/.ssh/authorized_keys
  fi
  ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A >/dev/null
}

case "${1:-}" in
  sshd)
    shift
    setup_ssh
    [ -s /root/.ssh/authorized_keys ] || {
      echo "hvd-yolo-entrypoint: no /root/.ssh/authorized_keys: mount your public key there or set SSH_AUTHORIZED_KEYS, else the launcher cannot log in" >&2
      exit 2
    }
    echo "sshd listening on port ${SSH_PORT:-2222}"
    exec /usr/sbin/sshd -D -e -p "${SSH_PORT:-2222}" "$@" ;;
  exec)
    shift
    [ $# -gt 0 ] || { echo "hvd-yolo-entrypoint: exec needs a command" >&2; exit 2; }
    exec "$@" ;;
  *)
    exec hvd-yolo "$@" ;;
esac
