# Shared by run.sh and kill.sh (sourced, not run): a throw-away redis-server, `deepdefense serve --replicas N`
# started and waited for (deadline), and a cleanup that stops both on exit.
#   start_redis              sets REDIS_PORT, REDIS_URL; nothing saved to disk
#   start_cluster N LOG ...  sets PORT, URL, SERVE_PID; extra arguments go to `deepdefense serve`
#   stop_cluster             SIGTERM (the replicas drain), SIGKILL after 60 s
# Needs WORK (a temporary folder) and READY_DEADLINE_S set by the caller.
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

REDIS_PID=
SERVE_PID=
start_redis() {
  REDIS_PORT=$(free_port)
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server did not answer PING within 10 s" >&2; return 1
}

start_cluster() {
  local replicas=$1 log=$2; shift 2
  PORT=$(free_port)
  URL="http://127.0.0.1:$PORT"
  deepdefense serve --replicas "$replicas" --replica-cpus 1 --state "$REDIS_URL" \
    --host 127.0.0.1 --port "$PORT" --log-level warning "$@" >"$log" 2>&1 &
  SERVE_PID=$!
  local t0; t0=$(date +%s)
  until curl -sf "$URL/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$SERVE_PID" 2>/dev/null || [ $(( $(date +%s) - t0 )) -gt "$READY_DEADLINE_S" ]; then
      echo "replicas=$replicas: not ready within ${READY_DEADLINE_S} s" >&2; tail -50 "$log" >&2; return 1
    fi
    sleep 1
  done
  echo "replicas=$replicas ready after $(( $(date +%s) - t0 )) s" >&2
}

stop_cluster() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID"; for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVE_PID" 2>/dev/null || true
  fi
  SERVE_PID=
}

cleanup() {
  stop_cluster
  [ -n "$REDIS_PID" ] && kill -KILL "$REDIS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
