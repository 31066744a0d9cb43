#!/usr/bin/env bash
# Runs the benchmark scenarios against a freshly started release server on this machine.
#   bench/run.sh realistic|wide|saturation|idle|http|all [extra supersynk-bench flags]
# Each scenario starts its own server (so RSS figures start from a fresh process), prints
# the bench tool's table, and keeps its JSON in bench/out/<scenario>*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin supersynk --bin supersynk-bench >&2
mkdir -p bench/out
port=${BENCH_PORT:-5301}
server_pid=

start_server() {
  # Leaders in the saturation runs push up to 500 times a second: above the default
  # per-connection message rate (200/s), which is sized for real clients.
  ./target/release/supersynk --bind 127.0.0.1 --port "$port" --log warn \
    --messages-per-second 100000 --message-burst 100000 "$@" &
  server_pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}
stop_server() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
trap stop_server EXIT

bench() { # name, flags... (the URL is $bench_url if set, else the plugin endpoint)
  local name=$1; shift
  ./target/release/supersynk-bench --url "${bench_url:-ws://127.0.0.1:$port/connect}" --server-pid "$server_pid" "$@" \
    --json >"bench/out/$name.json"
  python3 - "bench/out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["connections_made", "pushes_sent", "deliveries_expected", "deliveries_received",
        "deliveries_lost", "deliveries_per_sec", "latency_p50_ms", "latency_p99_ms", "latency_p999_ms",
        "latency_max_ms", "server_cpu_pct", "server_rss_mib", "bench_cpu_pct", "server_rss_per_connection_kib",
        "requests_sent", "requests_answered", "requests_per_sec", "status_200", "status_204", "status_4xx",
        "status_5xx", "errors", "unanswered", "reconnects", "self_in_answer", "incomplete_answers"]
print(sys.argv[2] + ": " + ", ".join(f"{k}={r[k]}" for k in keys if k in r))
PY
}

scenario() {
  case $1 in
    realistic) # 2,500 sessions x 4 players, a push every 170 ms, plugin pings, with deflate
      start_server; bench realistic --sessions 2500 --followers 3 --interval-ms 170 --duration-s 20 \
        --ping-ms 1700 --deflate "${@:2}"; stop_server
      start_server; bench realistic-plain --sessions 2500 --followers 3 --interval-ms 170 --duration-s 20 \
        --ping-ms 1700 "${@:2}"; stop_server ;;
    wide) # 1 leader, 1,000 followers, a push every 10 ms
      start_server; bench wide --sessions 1 --followers 1000 --interval-ms 10 --duration-s 20 "${@:2}"; stop_server
      start_server; bench wide-deflate --sessions 1 --followers 1000 --interval-ms 10 --duration-s 20 --deflate "${@:2}"; stop_server ;;
    saturation) # rising offered load on 20 sessions x 100 followers until p99 passes 50 ms
      for deflate in "" "--deflate"; do
        for interval in ${SAT_INTERVALS:-20 15 10 6 4 3 2}; do
          start_server
          bench "saturation${deflate:+-deflate}-$interval" --sessions 20 --followers 100 --interval-ms "$interval" \
            --duration-s 10 $deflate "${@:2}"
          stop_server
        done
      done ;;
    idle) # 19,500 idle sockets (the fd hard limit here is 20,000 per process)
      start_server; bench idle --sessions 4875 --followers 3 --idle --duration-s 5 "${@:2}"; stop_server
      start_server; bench idle-deflate --sessions 4875 --followers 3 --idle --duration-s 5 --deflate "${@:2}"; stop_server ;;
    http) # HTTP channel API: channels of 4 clients, each posting its state every 50 ms (20 Hz)
      # over its own keep-alive connection: 250 channels = 20,000 requests/s, 500 = 40,000/s
      local bench_url="http://127.0.0.1:$port"
      start_server; bench http --http-channels --sessions 250 --followers 3 --interval-ms 50 --duration-s 15 \
        "${@:2}"; stop_server
      start_server; bench http-heavy --http-channels --sessions 500 --followers 3 --interval-ms 50 \
        --duration-s 15 "${@:2}"; stop_server ;;
    all) for s in realistic wide saturation idle http; do scenario "$s" "${@:2}"; done ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}
scenario "${1:-all}" "${@:2}"
