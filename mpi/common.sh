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

# hostfile_hosts FILE COLON_OK: print "LINE HOST" for each host of FILE (lines "HOST",
# "HOST slots=N [max_slots=N]", and "HOST:N" when COLON_OK=1; # starts a comment). A line in
# another form ends the script, naming the file, the line and what is wrong with it.
hostfile_hosts() {
  local file=$1 colon=$2 out
  out=$(awk -v colon="$colon" '
    { text = $0; sub(/#.*/, "") }
    NF == 0 { next }
    {
      host = $1; bad = ""
      if (host ~ /:/) {
        if (colon != 1 || host !~ /^[^:]+:[1-9][0-9]*$/) bad = "\"" host "\" is not a host name (write HOST slots=N)"
        else host = substr(host, 1, index(host, ":") - 1)
      }
      if (bad == "" && host !~ /^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$/)
        bad = "\"" host "\" is not a host name"
      for (i = 2; i <= NF && bad == ""; i++)
        if ($i !~ /^(slots|max_slots|max-slots)=[1-9][0-9]*$/)
          bad = "\"" $i "\" is not slots=N or max_slots=N (N a positive whole number)"
      if (bad != "") { gsub(/[\t\r]/, " ", text); print "BAD " NR " " bad ": \"" text "\""; failed = 1; exit }
      found = found NR " " host "\n"
    }
    END { if (!failed) printf "%s", found }' "$file") || die "hostfile '$file' cannot be read"
  case "$out" in
    BAD*) local line=${out#BAD }; line=${line%% *}; out=${out#BAD "$line" }
          die "hostfile '$file' line $line: $out; each line is HOST slots=N (see mpi/hostfile.example)" ;;
    "") die "hostfile '$file' lists no host (lines HOST slots=N; see mpi/hostfile.example)" ;;
  esac
  printf '%s\n' "$out"
}

# hostlist_hosts LIST: print "ENTRY HOST" for each entry of a -H list ("host:N,host:N").
hostlist_hosts() {
  local entry host i=0
  IFS=, read -ra entries <<< "$1"
  [ ${#entries[@]} -gt 0 ] || die "-H '$1' lists no host (write host:N,host:N)"
  for entry in "${entries[@]}"; do
    i=$((i + 1))
    host=${entry%%:*}
    [[ "$host" =~ ^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$ ]] && \
      { [ "$entry" = "$host" ] || [[ "${entry#*:}" =~ ^[1-9][0-9]*$ ]]; } \
      || die "-H '$1': entry $i '$entry' is not host or host:N (N ranks on that host)"
    printf '%s %s\n' "$i" "$host"
  done
}

# is_local_host HOST: true for this node's own names (the launcher starts no ssh for them).
is_local_host() {
  case "$1" in
    localhost|127.0.0.1|"$(hostname)"|"$(hostname -s 2>/dev/null)"|"$(hostname -f 2>/dev/null)") return 0 ;;
  esac
  return 1
}

# check_hosts WHERE SSH_CHECK SSH_PORT: read "N HOST" lines (hostfile_hosts, hostlist_hosts)
# and end the script at the first host that does not resolve, or (SSH_CHECK=1) that this node
# cannot reach by ssh without a password, naming WHERE (the hostfile or -H list) and N.
check_hosts() {
  local where=$1 ssh_check=$2 port=$3 n host err
  local -A seen=()
  while read -r n host; do
    [ -n "$host" ] || continue
    is_local_host "$host" && continue
    [ -z "${seen[$host]:-}" ] || continue
    seen[$host]=1
    getent ahosts "$host" >/dev/null 2>&1 \
      || die "$where $n: host '$host' does not resolve (no /etc/hosts or DNS entry): check the name"
    [ "$ssh_check" = 1 ] || continue
    err=$(ssh -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=no \
          ${port:+-p "$port"} "$host" true 2>&1 </dev/null) \
      || die "$where $n: host '$host' cannot be reached by ssh without a password ($(printf '%s' "$err" | tr -s '\r\n' '  ' | sed 's/ *$//')): check that it is up and that 'ssh ${port:+-p $port }$host true' works from here"
  done
}
