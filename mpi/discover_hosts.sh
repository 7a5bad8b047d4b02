#!/usr/bin/env bash
# Host discovery for elastic runs (horovodrun --host-discovery-script; mpi/horovodrun.sh
# --elastic sets it): prints "host:slots" for each line of the hostfile an admin edits while the
# job runs, HVD_YOLO_HOSTFILE (or the first argument). Lines as mpi/hostfile.example
# ("node1 slots=4"); "node1:4" and a bare "node1" (1 slot) also work; # starts a comment.
set -euo pipefail
f=${HVD_YOLO_HOSTFILE:-${1:-}}
[ -n "$f" ] || { echo "mpi/discover_hosts.sh: error: set HVD_YOLO_HOSTFILE to the hostfile" >&2; exit 2; }
[ -r "$f" ] || { echo "mpi/discover_hosts.sh: error: hostfile '$f' not readable" >&2; exit 2; }
awk '{ sub(/#.*/, "") } NF {
  host = $1; slots = 1
  for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) slots = substr($i, 7)
  if (host ~ /:/) print host; else print host ":" slots
}' "$f"
