#!/usr/bin/env bash
# Ray's cluster launcher (clusters/laptop.yaml: `ray up` / `ray submit` / `ray down`) with the
# Python you run this from.
#
# The launcher runs every command on the head in an SSH login shell that sources ~/.bashrc and
# knows nothing of the virtual environment (or pyenv, conda) hetero-sched is installed in:
# its `python` is the system one (`No module named 'numpy'`), its `ray` another Ray. This
# records the interpreter of the shell you call it from — `python` on your PATH, or
# $HETERO_SCHED_PYTHON — and your PYTHONPATH, as two wrappers in ~/.hetero-sched/launcher/bin
# (`python`, and `ray` = that python -m ray), and puts that folder first on PATH in ~/.bashrc
# (a marked block; `down` removes it). `ray up`, `ray start` on the head and `python SCRIPT`
# of `ray submit` then all run that interpreter. The head is this machine (local provider),
# so the path is valid there.
#
#   clusters/launcher.sh up [CONFIG]     record the interpreter, then `ray up -y CONFIG` (default clusters/laptop.yaml)
#   clusters/launcher.sh env             record it only (run `ray up` / `ray submit` yourself)
#   clusters/launcher.sh down [CONFIG]   `ray down -y CONFIG`, then remove the block and the wrappers
#
# CAUTION: `ray up` and `ray down` run `ray stop`, which stops every Ray cluster on this machine.
set -euo pipefail

die() { echo "launcher.sh: $*" >&2; exit 2; }

cmd="${1:-}"; shift || true
config="${1:-$(cd "$(dirname "$0")" && pwd)/laptop.yaml}"
dir="$HOME/.hetero-sched/launcher"
bin="$dir/bin"
begin="# >>> hetero-sched launcher >>>"
end="# <<< hetero-sched launcher <<<"

strip_block() {  # remove our marked block from ~/.bashrc
  [ -f "$HOME/.bashrc" ] || return 0
  awk -v b="$begin" -v e="$end" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' "$HOME/.bashrc" > "$HOME/.bashrc.tmp"
  cat "$HOME/.bashrc.tmp" > "$HOME/.bashrc"; rm -f "$HOME/.bashrc.tmp"
}

record() {  # wrappers for this shell's interpreter, and the ~/.bashrc block putting them first
  local py
  py="${HETERO_SCHED_PYTHON:-$(command -v python || command -v python3 || true)}"
  [ -n "$py" ] || die "no python on PATH (activate your environment, or set HETERO_SCHED_PYTHON)"
  py="$("$py" -c 'import sys; print(sys.executable)')" || die "cannot run $py"
  "$py" -c 'import hetero_sched, ray' 2>/dev/null \
    || die "$py cannot import hetero_sched and ray (activate the environment they are installed in)"
  mkdir -p "$bin"
  local pp=""
  [ -n "${PYTHONPATH:-}" ] && pp="export PYTHONPATH='${PYTHONPATH}'\${PYTHONPATH:+:\$PYTHONPATH}; "
  printf '#!/bin/sh\n%sexec %q "$@"\n' "$pp" "$py" > "$bin/python"
  printf '#!/bin/sh\n%sexec %q -m ray.scripts.scripts "$@"\n' "$pp" "$py" > "$bin/ray"
  chmod +x "$bin/python" "$bin/ray"
  strip_block
  printf '%s\nexport PATH="%s:$PATH"\n%s\n' "$begin" "$bin" "$end" >> "$HOME/.bashrc"
  echo "launcher.sh: the head's python and ray are now $py (wrappers in $bin, first on PATH in ~/.bashrc)"
}

case "$cmd" in
  up)
    record
    "$bin/ray" up -y "$config"
    ;;
  env)
    record
    ;;
  down)
    if [ -x "$bin/ray" ]; then "$bin/ray" down -y "$config"; else ray down -y "$config"; fi
    strip_block
    rm -rf "$dir"
    ;;
  -h|--help|"")
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [ -n "$cmd" ] || exit 2
    ;;
  *) die "unknown command '$cmd' (up, env, down)" ;;
esac
