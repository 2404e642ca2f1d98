#!/usr/bin/env bash
# SSH to 127.0.0.1 for the Ray cluster launcher's local provider (clusters/laptop.yaml):
# `ray up` reaches its head over SSH even when the head is this machine. This starts a
# private sshd listening on 127.0.0.1 only (never a public interface), on its own port,
# accepting one generated ed25519 key; ~/.ssh/config gets a `Host 127.0.0.1` block naming
# that port and key (Ray has no ssh_port option). Needs openssh-server and rsync installed.
#
#   clusters/ssh-loopback.sh up [--port N]   idempotent (default port 2222, or $HETERO_SSH_PORT)
#   clusters/ssh-loopback.sh check           exit 0 if `ssh 127.0.0.1` works without a password
#   clusters/ssh-loopback.sh down            stop that sshd, remove the config block and key line
set -euo pipefail

die() { echo "ssh-loopback.sh: $*" >&2; exit 2; }

cmd="${1:-}"; shift || true
port="${HETERO_SSH_PORT:-2222}"
while [ $# -gt 0 ]; do
  case "$1" in
    --port) [ $# -ge 2 ] || die "--port needs a value"; port="$2"; shift 2 ;;
    *) die "unknown flag '$1'" ;;
  esac
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

dir="$HOME/.hetero-sched/sshd"
key="$dir/client_ed25519"
begin="# >>> hetero-sched loopback ssh >>>"
end="# <<< hetero-sched loopback ssh <<<"

strip_block() {  # remove our marked block from file $1
  [ -f "$1" ] || return 0
  awk -v b="$begin" -v e="$end" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' "$1" > "$1.tmp"
  cat "$1.tmp" > "$1"; rm -f "$1.tmp"
}

running_pid() {  # PID of our sshd, if the pidfile names a live sshd started with our config
  local pid
  [ -f "$dir/sshd.pid" ] || return 1
  read -r pid < "$dir/sshd.pid"
  [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$dir/sshd_config" || return 1
  echo "$pid"
}

check() {
  ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR 127.0.0.1 true
}

cmd_up() {
  local sshd; sshd="$(command -v sshd || echo /usr/sbin/sshd)"
  [ -x "$sshd" ] || die "no sshd: install openssh-server (Debian: apt-get install openssh-server rsync)"
  command -v rsync > /dev/null || die "no rsync: install it (Debian: apt-get install rsync)"
  mkdir -p "$dir" "$HOME/.ssh"
  chmod 700 "$dir" "$HOME/.ssh"
  [ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -C hetero-loopback -f "$key"
  [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C hetero-loopback-host -f "$dir/host_ed25519"
  touch "$HOME/.ssh/authorized_keys"; chmod 600 "$HOME/.ssh/authorized_keys"
  grep -qF "$(cat "$key.pub")" "$HOME/.ssh/authorized_keys" || cat "$key.pub" >> "$HOME/.ssh/authorized_keys"
  # ssh takes the first value it finds for an option: our block goes first
  touch "$HOME/.ssh/config"; chmod 600 "$HOME/.ssh/config"; strip_block "$HOME/.ssh/config"
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$dir/host_ed25519.pub")" > "$dir/known_hosts"
  { printf '%s\nHost 127.0.0.1\n  Port %s\n  IdentityFile %s\n  UserKnownHostsFile %s\n%s\n' \
      "$begin" "$port" "$key" "$dir/known_hosts" "$end"
    cat "$HOME/.ssh/config"; } > "$HOME/.ssh/config.tmp"
  cat "$HOME/.ssh/config.tmp" > "$HOME/.ssh/config"; rm -f "$HOME/.ssh/config.tmp"
  cat > "$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
EOF
  if ! running_pid > /dev/null; then
    [ "$(id -u)" != 0 ] || mkdir -p /run/sshd  # privilege separation directory
    "$sshd" -t -f "$dir/sshd_config" || die "sshd rejects $dir/sshd_config"
    "$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log"
  fi
  local i; for i in $(seq 1 50); do check 2> /dev/null && break; sleep 0.1; done
  check || die "ssh to 127.0.0.1:$port does not work (log: $dir/sshd.log)"
  echo "sshd on 127.0.0.1:$port (pid $(running_pid)); ~/.ssh/config Host 127.0.0.1 -> $key"
}

cmd_down() {
  local pid
  if pid="$(running_pid)"; then kill "$pid"; fi
  rm -f "$dir/sshd.pid"
  strip_block "$HOME/.ssh/config"
  if [ -f "$key.pub" ] && [ -f "$HOME/.ssh/authorized_keys" ]; then
    grep -vF "$(cat "$key.pub")" "$HOME/.ssh/authorized_keys" > "$HOME/.ssh/authorized_keys.tmp" || true
    cat "$HOME/.ssh/authorized_keys.tmp" > "$HOME/.ssh/authorized_keys"; rm -f "$HOME/.ssh/authorized_keys.tmp"
  fi
  echo "loopback sshd stopped"
}

case "$cmd" in
  up) cmd_up ;;
  check) check ;;
  down) cmd_down ;;
  *) die "usage: clusters/ssh-loopback.sh up [--port N] | check | down" ;;
esac
