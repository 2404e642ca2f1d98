#!/usr/bin/env bash
# A labelled Ray cluster on this machine, outliving any one driver: a head plus Trainium
# prefill nodes (neuron_cores), CS-3 decode nodes (cs3) and GPU nodes (GPU), every node
# carrying the hetero.device / hetero.pool / hetero.node labels `hetero-sched run` places
# its actors by. Nodes on 127.0.0.1, the dashboard on 127.0.0.1 only, ports of its own (so it
# runs beside other Ray clusters), token authentication on, and `down` stops only the
# processes `up` started (never `ray stop`). clusters/README.md explains it all.
#
#   clusters/laptop.sh up [flags]      start (idempotent: a running cluster is left as is)
#   clusters/laptop.sh status          nodes, resources and labels, as the cluster reports them
#   clusters/laptop.sh env             `export` lines a client shell needs (eval "$(... env)")
#   clusters/laptop.sh plan [flags]    the nodes `up` would start, one JSON object per line
#   clusters/laptop.sh down            stop this cluster's processes
set -euo pipefail

usage() {
  cat <<'EOF'
usage: clusters/laptop.sh up|status|env|plan|down [flags]

sizes (up):
  --prefill-devices LIST   Trainium kinds, one set of prefill nodes each (default trn2,trn3)
  --prefill-nodes N        prefill nodes per Trainium kind (default 1)
  --neuron-cores N         neuron_cores per prefill node (default 256: four trn2.48xlarge at LNC=2)
  --decode-nodes N         CS-3 decode nodes (default 1)
  --cs3 N                  cs3 (CS-3 systems) per decode node (default 4)
  --gpu-device NAME        GPU kind of the colocated nodes (default h100)
  --gpu-nodes N            colocated GPU nodes, pool "both" (default 1; 0 for none)
  --gpus N                 GPUs per GPU node (default 48: six 8-GPU servers)
  --object-store-mb N      object store per node (default 256)
ports (up; none of Ray's defaults; the dashboard listens on 127.0.0.1 only):
  --port N                 GCS (default 26379)
  --dashboard-port N       dashboard and job API (default 28265)
  --client-port N          Ray client server (default 20001)
  --node-port-base N       node k uses N+10k .. N+10k+5 (default 23000)
  --worker-ports A-B       worker processes (default 24000-24999)
any command:
  --state-dir DIR          token, logs, PIDs (default $HETERO_LAPTOP_DIR or ~/.hetero-sched/laptop)
EOF
}

die() { echo "laptop.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------- flags
cmd="${1:-}"
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift
case "$cmd" in
  -h|--help|help) usage; exit 0 ;;
  up|status|env|plan|down) ;;
  *) die "unknown command '$cmd' (up, status, env, plan or down)" ;;
esac

state_dir="${HETERO_LAPTOP_DIR:-$HOME/.hetero-sched/laptop}"
prefill_devices="trn2,trn3"; prefill_nodes=1; neuron_cores=256
decode_nodes=1; cs3=4
gpu_device="h100"; gpu_nodes=1; gpus=48
object_store_mb=256
gcs_port=26379; dashboard_port=28265; client_port=20001
node_port_base=23000; worker_ports="24000-24999"

while [ $# -gt 0 ]; do
  flag="$1"
  [ $# -ge 2 ] || die "$flag needs a value"
  value="$2"
  case "$flag" in
    --state-dir) state_dir="$value" ;;
    --prefill-devices) prefill_devices="$value" ;;
    --prefill-nodes) prefill_nodes="$value" ;;
    --neuron-cores) neuron_cores="$value" ;;
    --decode-nodes) decode_nodes="$value" ;;
    --cs3) cs3="$value" ;;
    --gpu-device) gpu_device="$value" ;;
    --gpu-nodes) gpu_nodes="$value" ;;
    --gpus) gpus="$value" ;;
    --object-store-mb) object_store_mb="$value" ;;
    --port) gcs_port="$value" ;;
    --dashboard-port) dashboard_port="$value" ;;
    --client-port) client_port="$value" ;;
    --node-port-base) node_port_base="$value" ;;
    --worker-ports) worker_ports="$value" ;;
    *) die "unknown flag '$flag' (see clusters/laptop.sh --help)" ;;
  esac
  shift 2
done

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
for pair in "prefill-nodes:$prefill_nodes" "neuron-cores:$neuron_cores" "decode-nodes:$decode_nodes" \
            "cs3:$cs3" "gpu-nodes:$gpu_nodes" "gpus:$gpus" "object-store-mb:$object_store_mb" \
            "port:$gcs_port" "dashboard-port:$dashboard_port" "client-port:$client_port" \
            "node-port-base:$node_port_base"; do
  is_count "${pair#*:}" || die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
done
[[ "$worker_ports" =~ ^([0-9]+)-([0-9]+)$ ]] || die "--worker-ports must be A-B, got '$worker_ports'"
min_worker_port="${BASH_REMATCH[1]}"; max_worker_port="${BASH_REMATCH[2]}"
[ "$neuron_cores" -ge 1 ] && [ "$cs3" -ge 1 ] && [ "$gpus" -ge 1 ] || die "--neuron-cores, --cs3 and --gpus must be >= 1"
[[ "$prefill_devices" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || die "--prefill-devices must be a comma list like trn2,trn3"
[[ "$gpu_device" =~ ^[a-z0-9]+$ ]] || die "--gpu-device must be a device name like h100"

nodes_dir="$state_dir/nodes"
env_file="$state_dir/cluster.env"
token_file="$state_dir/auth_token"

# ---------------------------------------------------------------- processes
# A node is one `ray start --block` run under setsid: its PID is the process group (and
# session) of every process of that node, and SIGTERM to it stops them all. We record the
# PID with its start time, so a recycled PID is never mistaken for ours.
start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }

leader_pid() {  # the recorded leader PID of node $1 if that very process is still running
  local file="$nodes_dir/$1.pid" pid started
  [ -f "$file" ] || return 1
  read -r pid started < "$file"
  [ -n "$pid" ] && [ "$(start_time "$pid")" = "$started" ] || return 1
  echo "$pid"
}

group_members() { ps -e -o pid=,pgid= | awk -v g="$1" '$2 == g {print $1}'; }

stop_node() {  # SIGTERM the node's leader (it stops its processes), then SIGKILL stragglers
  local name="$1" pid pgid i
  [ -f "$nodes_dir/$name.pid" ] || return 0
  read -r pgid _ < "$nodes_dir/$name.pid"
  if pid="$(leader_pid "$name")"; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  for i in $(seq 1 100); do
    ! leader_pid "$name" > /dev/null && [ -z "$(group_members "$pgid")" ] && break
    sleep 0.1
  done
  if [ -n "$(group_members "$pgid")" ]; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  rm -f "$nodes_dir/$name.pid"
}

# ---------------------------------------------------------------- cluster shape
# One line per node: name|CPUs|GPUs|custom resources (JSON)|labels. The head carries the CPUs
# the scheduler actor and job drivers use and no device resource; a device node carries what
# its groups' actors ask for (GroupSpec.ray_resources: neuron_cores = logical NeuronCores,
# cs3 = CS-3 systems, GPU) and the labels their label_selector names (hetero.device,
# hetero.pool), plus hetero.node naming it.
node_lines() {
  echo "head|2|0|{}|hetero.node=head"
  local dev i name
  IFS=',' read -r -a devs <<< "$prefill_devices"
  for dev in "${devs[@]}"; do
    for ((i = 0; i < prefill_nodes; i++)); do
      name="$dev-prefill-$i"
      echo "$name|1|0|{\"neuron_cores\":$neuron_cores}|hetero.device=$dev,hetero.pool=prefill,hetero.node=$name"
    done
  done
  for ((i = 0; i < decode_nodes; i++)); do
    name="cs3-decode-$i"
    echo "$name|1|0|{\"cs3\":$cs3}|hetero.device=cs3,hetero.pool=decode,hetero.node=$name"
  done
  for ((i = 0; i < gpu_nodes; i++)); do
    name="$gpu_device-both-$i"
    echo "$name|1|$gpus|{}|hetero.device=$gpu_device,hetero.pool=both,hetero.node=$name"
  done
}

# `env` arguments: what every node and client of this cluster needs (RAY_AUTH_TOKEN would take
# precedence over the token file, RAY_ADDRESS would point ray start elsewhere)
token_env=(-u RAY_ADDRESS -u RAY_AUTH_TOKEN RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$token_file")

load_state() {
  [ -f "$env_file" ] || return 1
  # shellcheck disable=SC1090
  . "$env_file"
}

# ---------------------------------------------------------------- commands
wait_started() {  # wait until node $1's log says it is up; fail if its leader died
  local name="$1" log="$state_dir/logs/$1.log" i
  for i in $(seq 1 600); do
    grep -q "Ray runtime started" "$log" 2>/dev/null && return 0
    leader_pid "$name" > /dev/null || { echo "laptop.sh: node $name failed to start; its log ($log):" >&2; tail -n 30 "$log" >&2; return 1; }
    sleep 0.1
  done
  echo "laptop.sh: node $name did not start within 60 s (log: $log)" >&2
  return 1
}

wait_gcs() {  # wait until the head's GCS accepts connections; fail if the head died
  local i
  for i in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/${gcs_address##*:}") 2>/dev/null && return 0
    leader_pid head > /dev/null || { wait_started head; return 1; }
    sleep 0.1
  done
  echo "laptop.sh: the head's GCS did not answer within 60 s (log: $state_dir/logs/head.log)" >&2
  return 1
}

start_node() {  # start node number $1 described by line $2, in the background
  local k="$1" line="$2" name cpus gpus resources labels base pid
  IFS='|' read -r name cpus gpus resources labels <<< "$line"
  base=$((node_port_base + 10 * k))
  # Each node its own temp dir: nodes starting together in one session directory would race
  # for the same socket and log file names. The head's is the cluster's (jobs resolve the
  # cluster from its ray_current_cluster file, never from /tmp/ray's).
  local node_temp_dir="$temp_dir"
  [ "$name" = head ] || node_temp_dir="$temp_dir/n$k"
  local -a args=(start --block --node-ip-address=127.0.0.1 --temp-dir="$node_temp_dir"
    --object-store-memory=$((object_store_mb * 1024 * 1024)) --labels="$labels"
    --node-manager-port=$base --object-manager-port=$((base + 1))
    --dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))
    --metrics-export-port=$((base + 4)) --runtime-env-agent-port=$((base + 5))
    --min-worker-port="$min_worker_port" --max-worker-port="$max_worker_port"
    --num-cpus="$cpus" --disable-usage-stats)
  [ "$gpus" = 0 ] || args+=(--num-gpus="$gpus")  # Ray takes GPUs only here, not in --resources
  [ "$resources" = "{}" ] || args+=(--resources="$resources")
  if [ "$name" = head ]; then
    args+=(--head --port="$gcs_port" --ray-client-server-port="$client_port"
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port")
  else
    args+=(--address="$gcs_address")
  fi
  : > "$state_dir/logs/$name.log"
  # setsid: the node gets its own session and process group, so `down` can stop exactly it.
  # A simple command (no function, no subshell): the background PID is the node's leader.
  # No drain on SIGTERM: `down` stops the whole cluster, there is nowhere to drain to.
  env "${token_env[@]}" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    setsid "$ray_bin" "${args[@]}" > "$state_dir/logs/$name.log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid $(start_time "$pid")" > "$nodes_dir/$name.pid"
}

cmd_up() {
  ray_bin="$(command -v ray)" || die "no 'ray' on PATH (activate the environment hetero-sched is installed in)"
  local shape; shape="$(node_lines | tr '\n' ';')ports=$gcs_port,$dashboard_port,$client_port,$node_port_base,$worker_ports,store=$object_store_mb"
  mkdir -p "$nodes_dir" "$state_dir/logs"
  chmod 700 "$state_dir"
  if leader_pid head > /dev/null; then
    load_state
    [ "$SHAPE" = "$shape" ] || die "a laptop cluster with other sizes is already up (state in $state_dir); run 'clusters/laptop.sh down' first"
  else
    # a clean start: stop whatever a dead head left behind
    local f; for f in "$nodes_dir"/*.pid; do [ -e "$f" ] && stop_node "$(basename "$f" .pid)"; done
    for port in "$gcs_port" "$dashboard_port" "$client_port"; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port on 127.0.0.1 is in use (pick others: --port, --dashboard-port, --client-port)"; fi
    done
    if [ ! -s "$token_file" ]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
    fi
    chmod 600 "$token_file"
    cat > "$env_file" <<EOF
SHAPE='$shape'
gcs_address='127.0.0.1:$gcs_port'
dashboard_url='http://127.0.0.1:$dashboard_port'
client_address='ray://127.0.0.1:$client_port'
temp_dir='/tmp/hetero-laptop-$gcs_port'
EOF
  fi
  load_state
  local t0=$SECONDS k=0 line name started=()
  while IFS= read -r line; do
    name="${line%%|*}"
    if ! leader_pid "$name" > /dev/null; then
      rm -f "$nodes_dir/$name.pid"
      start_node "$k" "$line"
      started+=("$name")
      # workers join the head's GCS: start them (together) once it answers, while the head
      # brings up its dashboard
      if [ "$name" = head ]; then wait_gcs || { cmd_down > /dev/null; exit 1; }; fi
    fi
    k=$((k + 1))
  done < <(node_lines)
  for name in "${started[@]}"; do
    wait_started "$name" || { cmd_down > /dev/null; exit 1; }
  done
  if [ ${#started[@]} -eq 0 ]; then
    echo "laptop cluster already up ($gcs_address)"
  else
    echo "laptop cluster up in $((SECONDS - t0)) s: started ${started[*]}"
  fi
  print_access
}

print_access() {
  cat <<EOF
  GCS (drivers, --address)   $gcs_address
  dashboard and job API      $dashboard_url
  token                      $token_file
  clients: eval "\$(clusters/laptop.sh env)"   (sets RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS, RAY_API_SERVER_ADDRESS)
EOF
}

cmd_plan() {  # the nodes `up` would start with these flags, one JSON object per line
  # (node_lines reads the sizes from globals: these locals must not shadow them)
  local node_name node_cpus node_gpus node_res node_labels res
  while IFS='|' read -r node_name node_cpus node_gpus node_res node_labels; do
    res="\"CPU\":$node_cpus"
    [ "$node_gpus" = 0 ] || res="$res,\"GPU\":$node_gpus"
    [ "$node_res" = "{}" ] || res="$res,${node_res:1:-1}"
    echo "{\"name\":\"$node_name\",\"resources\":{$res},\"labels\":{\"$(sed 's/=/":"/g; s/,/","/g' <<< "$node_labels")\"}}"
  done < <(node_lines)
}

cmd_env() {
  load_state || die "no laptop cluster state in $state_dir (run 'clusters/laptop.sh up')"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$(printf %q "$token_file")"
  echo "unset RAY_AUTH_TOKEN"
  echo "export RAY_ADDRESS=$gcs_address"
  echo "export RAY_API_SERVER_ADDRESS=$dashboard_url"
}

cmd_status() {
  load_state || die "no laptop cluster state in $state_dir (run 'clusters/laptop.sh up')"
  local f name pid
  echo "processes (state in $state_dir):"
  for f in "$nodes_dir"/*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    if pid="$(leader_pid "$name")"; then echo "  $name: running (pid $pid)"; else echo "  $name: not running"; fi
  done
  leader_pid head > /dev/null || { echo "head is not running"; exit 1; }
  print_access
  env "${token_env[@]}" python3 - "$dashboard_url" <<'EOF'
"""Nodes as the cluster reports them (the state API, through the token-checked dashboard)."""
import sys
from ray.util.state import list_nodes

HIDDEN = ("memory", "object_store_memory")
nodes = sorted(list_nodes(address=sys.argv[1], detail=True, raise_on_missing_output=False),
               key=lambda n: (n.labels.get("hetero.node") != "head", n.labels.get("hetero.node", "")))
print(f"{'node':<16} {'state':<6} {'resources':<60} labels")
for n in nodes:
    res = ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources_total.items())
                    if k not in HIDDEN and not k.startswith("node:"))
    labels = ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items()) if not k.startswith("ray.io/node"))
    print(f"{n.labels.get('hetero.node', '?'):<16} {n.state:<6} {res:<60} {labels}")
EOF
}

cmd_down() {
  [ -d "$nodes_dir" ] || { echo "no laptop cluster state in $state_dir: nothing to stop"; return 0; }
  local f name stopped=() waiting=()
  # workers first (together), then the head: workers would otherwise wait for a vanished GCS
  for f in "$nodes_dir"/*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    [ "$name" = head ] && continue
    stop_node "$name" & waiting+=($!)
    stopped+=("$name")
  done
  [ ${#waiting[@]} -eq 0 ] || wait "${waiting[@]}"
  if [ -f "$nodes_dir/head.pid" ]; then stop_node head; stopped+=(head); fi
  if load_state 2>/dev/null && [ -n "${temp_dir:-}" ]; then rm -f "$temp_dir/ray_current_cluster"; fi
  if [ ${#stopped[@]} -eq 0 ]; then echo "laptop cluster not running"; else echo "laptop cluster down: stopped ${stopped[*]}"; fi
}

case "$cmd" in
  up) cmd_up ;;
  status) cmd_status ;;
  env) cmd_env ;;
  plan) cmd_plan ;;
  down) cmd_down ;;
esac
