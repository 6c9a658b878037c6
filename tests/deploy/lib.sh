# Helpers shared by the tests/deploy scripts: a scratch directory, processes started in the
# background and stopped (by their pid) when the script exits, waits on observable events.

scratch=""
pids=()

# Stops the processes newest first (workers before the coordinator they report to): SIGTERM,
# then SIGKILL for one still running after 30 s.
deploy_cleanup() {
  local i pid deadline
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill "$pid" 2>/dev/null || continue
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [ -z "$scratch" ] || rm -rf "$scratch"
}

# deploy_scratch BUILD_DIR NAME: a fresh directory under the build directory, removed at exit.
deploy_scratch() {
  scratch=$(mktemp -d "$1/$2.XXXXXX")
  trap deploy_cleanup EXIT
}

# deploy_start LOG COMMAND...: runs COMMAND in the background, output to LOG; stopped at exit.
deploy_start() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  pids+=($!)
}

# deploy_wait SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s until it succeeds; fails naming
# WHAT after SECONDS.
deploy_wait() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "FAIL: no $what within ${seconds}s" >&2
      return 1
    fi
    sleep 0.2
  done
}

deploy_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# deploy_ready_field FILE KEY: "grpc" or "http" from a coordinator's --ready-file.
deploy_ready_field() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}
