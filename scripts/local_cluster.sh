#!/usr/bin/env bash
# A local Ray cluster for development, with Ray's token authentication on.
#
#   scripts/local_cluster.sh start                 # head node on this machine; prints its address
#   scripts/local_cluster.sh submit [--no-wait] [-- CMD ...]
#                                                  # ray job submit --working-dir . -- CMD; follows the
#                                                  # logs and fails if the job fails. Default CMD: the
#                                                  # CPU demo pipeline (see DEFAULT_CMD below)
#   scripts/local_cluster.sh logs JOB_ID           # follow a job's logs
#   scripts/local_cluster.sh status [JOB_ID]       # cluster resources, or the status of one job
#   scripts/local_cluster.sh list                  # all jobs
#   scripts/local_cluster.sh env                   # eval "$(scripts/local_cluster.sh env)" and use
#                                                  # plain `ray job ...` commands against the cluster
#   scripts/local_cluster.sh stop                  # stop this cluster, and only this one
#
# Every stage job works the same way: `submit -- python jobs/<stage>.py --config ... key=value`.
# The job runs in a copy of the repository (the runtime environment's working_dir) whose
# current directory is inside the Ray temp dir: give it absolute run_dir/cache_dir paths, or an
# object-store URI (run_dir=s3://...), as DEFAULT_CMD does.
#
# Safety: every port of the cluster listens on 127.0.0.1 only: the dashboard and job API
# (--dashboard-host), and Ray's own ports (GCS, raylet, object manager, workers, agents, Ray
# client, metrics export) because the node IP is the loopback address. `ray start
# --node-ip-address=127.0.0.1` alone is not enough on Linux: Ray replaces a loopback node IP by
# the host's primary address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-node mode),
# which is therefore set for `ray start` (every process of the cluster inherits it) and for every
# CLI call (`env` prints it too). Token authentication is on as well (RAY_AUTH_MODE=token for
# `ray start` and for every CLI call): other local users can reach loopback ports. Token auth
# does not encrypt traffic. The token is generated here, into a file readable only by you under
# the state dir (outside the repository); nothing reads or writes ~/.ray/auth_token, and a
# RAY_AUTH_TOKEN already in your environment is ignored so that the token of the cluster and of
# the CLI are always the same one.
#
# The state dir must be yours alone: an existing one is refused unless it is a directory (not a
# symlink) owned by you with mode 700, and its state file is read as KEY=VALUE data (known keys,
# checked values), never sourced.
#
# `stop` never runs `ray stop` (which kills every Ray process on the host, other users' clusters
# included): it stops the `ray start --block` process it recorded and its process tree (see
# scripts/_local_cluster.py).
#
# Settings (environment variables):
#   MLLM_MSR_RAY_DIR          state dir: token, logs, Ray temp dir (default
#                             ${TMPDIR:-/tmp}/mllm-msr-ray-$UID; created with mode 700, refused
#                             when not yours or not mode 700). Keep it short: Ray's Unix
#                             sockets live under it and their paths must stay under 107 bytes.
#   MLLM_MSR_RAY_NUM_CPUS     CPUs the node offers (default: all)
#   MLLM_MSR_RAY_NUM_GPUS     GPUs the node offers (default: auto-detected)
#   MLLM_MSR_RAY_OBJECT_STORE_BYTES   object store size (default 1000000000)
#   MLLM_MSR_RAY_PORT, MLLM_MSR_RAY_DASHBOARD_PORT, MLLM_MSR_RAY_CLIENT_PORT,
#   MLLM_MSR_RAY_AGENT_PORT   GCS / dashboard / Ray client / dashboard agent ports
#                             (defaults 6379, 8265, 10001, 52365)
#   MLLM_MSR_RAY_MIN_WORKER_PORT, MLLM_MSR_RAY_MAX_WORKER_PORT   port range of the worker
#                             processes (defaults 10002, 19999, as `ray start`; 0 and 0: ports
#                             the OS chooses, never one another cluster already holds)
#   MLLM_MSR_RAY_FREE_PORTS=1 pick free ports for all of these instead (several clusters per
#                             host; Ray's other ports are always chosen by the OS)
#   MLLM_MSR_RAY_START_TIMEOUT  seconds to wait for the job API (default 120)
#   MLLM_MSR_RAY_DRAIN_S      seconds Ray may drain the node on `stop` (default 0: stop at once,
#                             as `ray stop` does; running jobs are killed either way)
#   MLLM_MSR_RAY_AUTOSCALING_CONFIG   an autoscaling config with Ray's fake multi-node provider
#                             (e.g. cluster/fake-autoscaling.yaml): the head's autoscaler starts
#                             worker nodes on this machine on demand and removes idle ones; they
#                             belong to the cluster (`stop` stops them too)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${MLLM_MSR_RAY_DIR:-${TMPDIR:-/tmp}/mllm-msr-ray-$(id -u)}
STATE=$DIR/cluster.env
if [ -x "$REPO/.venv/bin/ray" ]; then
  BIN=$REPO/.venv/bin
  export PATH="$BIN:$PATH"  # `python` in job entrypoints is the project's interpreter
else
  BIN=$(dirname "$(command -v ray)")
fi
PY=$BIN/python
HELPER=$REPO/scripts/_local_cluster.py
# Large or private local folders never go into the job's working_dir upload.
EXCLUDES='[".git", ".venv", ".cache", "runs", "bench/results", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "build", "dist"]'
DEFAULT_CMD=(python jobs/pipeline.py --config configs/demo-cpu.yaml
  "run_dir=$REPO/runs/demo-cpu" "cache_dir=$REPO/.cache/mllm_msr")

die() { echo "local_cluster: $*" >&2; exit 1; }

# The state dir holds the token and the state file that tells `stop` which processes to kill:
# it must be ours alone. Its default path is predictable (another local user could create it
# first, or plant files in it), so an existing dir is used only when it is a real directory (not
# a symlink), owned by us, with mode 700; it is never "fixed" with chmod, since whatever is in it
# may already have been tampered with.
check_state_dir() {
  [ -e "$DIR" ] || [ -L "$DIR" ] || return 0
  local mode
  mode=$(stat -c %a "$DIR" 2>/dev/null || stat -f %Lp "$DIR" 2>/dev/null || echo '?')
  [ ! -L "$DIR" ] || die "state dir $DIR is a symlink: refusing it (set MLLM_MSR_RAY_DIR)"
  [ -d "$DIR" ] || die "state dir $DIR is not a directory (set MLLM_MSR_RAY_DIR)"
  [ -O "$DIR" ] || die "state dir $DIR is not owned by you (uid $(id -u)): refusing to use it" \
    "(someone else may have created it; set MLLM_MSR_RAY_DIR to a dir of your own)"
  [ -n "$(find "$DIR" -maxdepth 0 -perm 0700)" ] || die "state dir $DIR has mode $mode, not 700:" \
    "others may have written to it. Check its contents, then chmod 700 it (or remove it)"
}

# The state file is data, never code: KEY=VALUE lines, keys from a fixed list, each value
# checked against a pattern and assigned without any shell evaluation.
STATE_KEYS="RAY_PID CLUSTER_ID DASHBOARD_URL GCS_PORT TOKEN_FILE"
state_value_ok() {
  case "$1" in
    RAY_PID | GCS_PORT) [[ $2 =~ ^[0-9]{1,10}$ ]] ;;
    CLUSTER_ID) [[ $2 =~ ^[0-9a-f]{32}$ ]] ;;
    DASHBOARD_URL) [[ $2 =~ ^http://127\.0\.0\.1:[0-9]{1,5}$ ]] ;;
    TOKEN_FILE) [ "$2" = "$DIR/auth_token" ] ;;
    *) return 1 ;;
  esac
}

read_state() {
  check_state_dir
  [ -f "$STATE" ] || die "no cluster recorded in $DIR (run: $0 start)"
  local line key value n=0 seen=" " k
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    [ -n "$line" ] || continue
    [[ $line == *=* ]] || die "$STATE line $n: not KEY=VALUE"
    key=${line%%=*} value=${line#*=}
    [[ $key =~ ^[A-Z_]+$ && " $STATE_KEYS " == *" $key "* ]] ||
      die "$STATE line $n: unknown key $(printf %q "$key")"
    state_value_ok "$key" "$value" ||
      die "$STATE line $n: invalid value for $key: $(printf %q "$value")"
    printf -v "$key" '%s' "$value"
    seen="$seen$key "
  done < "$STATE"
  for k in $STATE_KEYS; do
    [[ $seen == *" $k "* ]] || die "$STATE: $k is missing"
  done
}

load_state() {
  read_state
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS
}

running() { [ -n "${RAY_PID:-}" ] && kill -0 "$RAY_PID" 2>/dev/null; }

cmd_start() {
  if [ -f "$STATE" ]; then
    load_state
    if running; then echo "already running: $DASHBOARD_URL (pid $RAY_PID)"; return 0; fi
    rm -f "$STATE"
  fi
  check_state_dir
  if [ ! -d "$DIR" ]; then
    mkdir -p "$(dirname "$DIR")"
    mkdir -m 700 "$DIR" || die "cannot create the state dir $DIR"
    check_state_dir  # it did not exist a moment ago: make sure it is the one we created
  fi
  local token_file=$DIR/auth_token
  if [ ! -s "$token_file" ]; then
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
  fi
  local port=${MLLM_MSR_RAY_PORT:-6379} dport=${MLLM_MSR_RAY_DASHBOARD_PORT:-8265}
  local cport=${MLLM_MSR_RAY_CLIENT_PORT:-10001} aport=${MLLM_MSR_RAY_AGENT_PORT:-52365}
  local wmin=${MLLM_MSR_RAY_MIN_WORKER_PORT:-10002} wmax=${MLLM_MSR_RAY_MAX_WORKER_PORT:-19999}
  if [ "${MLLM_MSR_RAY_FREE_PORTS:-0}" = 1 ]; then
    read -r port dport cport aport < <("$PY" "$HELPER" free-ports 4)
    wmin=0 wmax=0
  fi
  local cluster_id
  cluster_id=$("$PY" -c 'import uuid; print(uuid.uuid4().hex)')
  local args=(start --head --block --node-ip-address=127.0.0.1
    --port="$port" --ray-client-server-port="$cport"
    --dashboard-host=127.0.0.1 --dashboard-port="$dport" --dashboard-agent-listen-port="$aport"
    --min-worker-port="$wmin" --max-worker-port="$wmax"
    --temp-dir="$DIR/ray"
    --object-store-memory="${MLLM_MSR_RAY_OBJECT_STORE_BYTES:-1000000000}"
    --disable-usage-stats)
  [ -n "${MLLM_MSR_RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$MLLM_MSR_RAY_NUM_CPUS")
  [ -n "${MLLM_MSR_RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$MLLM_MSR_RAY_NUM_GPUS")
  local fake=()
  if [ -n "${MLLM_MSR_RAY_AUTOSCALING_CONFIG:-}" ]; then
    "$PY" "$HELPER" autoscaling-config "$MLLM_MSR_RAY_AUTOSCALING_CONFIG" \
      "$DIR/autoscaling.json" "127.0.0.1:$port" || die "see MLLM_MSR_RAY_AUTOSCALING_CONFIG above"
    args+=(--autoscaling-config="$DIR/autoscaling.json")
    # as ray.cluster_utils.AutoscalingCluster starts its head; the update interval is 5 s otherwise
    fake=(RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1)
  fi
  local detach=()
  command -v setsid >/dev/null && detach=(setsid)
  local t0=$SECONDS
  # The marker variable is inherited by every process of the cluster; `stop` looks for it.
  env -u RAY_AUTH_TOKEN -u RAY_ADDRESS RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file" \
    MLLM_MSR_RAY_CLUSTER_ID="$cluster_id" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${MLLM_MSR_RAY_DRAIN_S:-0}" ${fake[@]+"${fake[@]}"} \
    nohup "${detach[@]}" "$BIN/ray" "${args[@]}" > "$DIR/ray-start.log" 2>&1 < /dev/null &
  local pid=$!
  (umask 077 && cat > "$STATE") <<EOF
RAY_PID=$pid
CLUSTER_ID=$cluster_id
DASHBOARD_URL=http://127.0.0.1:$dport
GCS_PORT=$port
TOKEN_FILE=$token_file
EOF
  if ! "$PY" "$HELPER" wait-ready "http://127.0.0.1:$dport" "$token_file" \
      "${MLLM_MSR_RAY_START_TIMEOUT:-120}"; then
    tail -n 30 "$DIR/ray-start.log" >&2 || true
    "$PY" "$HELPER" stop "$pid" "$cluster_id" 10 || true
    rm -f "$STATE"
    die "the cluster did not come up (log: $DIR/ray-start.log)"
  fi
  echo "Ray cluster up in $((SECONDS - t0)) s: job API http://127.0.0.1:$dport, GCS port $port"
  echo "state, token and logs: $DIR"
}

cmd_submit() {
  load_state
  running || die "the recorded cluster (pid $RAY_PID) is not running"
  local opts=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --) shift; break ;;
      *) opts+=("$1"); shift ;;
    esac
  done
  local cmd=("$@")
  [ ${#cmd[@]} -gt 0 ] || cmd=("${DEFAULT_CMD[@]}")
  cd "$REPO"
  "$BIN/ray" job submit --address "$DASHBOARD_URL" --working-dir . \
    --runtime-env-json "{\"excludes\": $EXCLUDES}" "${opts[@]}" -- "${cmd[@]}"
}

cmd_logs() {
  [ $# -eq 1 ] || die "usage: $0 logs JOB_ID"
  load_state
  "$BIN/ray" job logs --address "$DASHBOARD_URL" --follow "$1"
}

cmd_status() {
  load_state
  running || die "the recorded cluster (pid $RAY_PID) is not running"
  if [ $# -eq 1 ]; then
    "$BIN/ray" job status --address "$DASHBOARD_URL" "$1"
  else
    "$BIN/ray" status --address "127.0.0.1:$GCS_PORT"
  fi
}

cmd_list() {
  load_state
  "$BIN/ray" job list --address "$DASHBOARD_URL"
}

cmd_env() {
  load_state
  printf 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=%q RAY_API_SERVER_ADDRESS=%q\n' \
    "$TOKEN_FILE" "$DASHBOARD_URL"
  echo 'export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0'
  echo 'unset RAY_AUTH_TOKEN'
}

cmd_stop() {
  if [ ! -f "$STATE" ]; then echo "no cluster recorded in $DIR"; return 0; fi
  load_state
  local t0=$SECONDS
  "$PY" "$HELPER" stop "$RAY_PID" "$CLUSTER_ID" || die "some processes survived (see above)"
  rm -f "$STATE"
  echo "stopped in $((SECONDS - t0)) s (logs kept in $DIR/ray)"
}

# Sourced (the tests call read_state), the script only defines its functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    start | submit | logs | status | list | env | stop) c=$1; shift; "cmd_$c" "$@" ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
  esac
fi
