#!/usr/bin/env bash
# Throughput of POST /logs/add and of the log store behind it, on a fresh release server.
#   bench/logs.sh [sqlite|postgres] [runs] [seconds] [connections]
# wrk (apt install wrk) posts the plugin's batch of 5 entries (bench/logs_add.lua) over keep-alive
# connections; one log listener follows all rooms meanwhile. Per run it prints requests/s
# (wrk), entries/s accepted, entries/s stored during the run, how long the store took to
# catch up after it, and entries dropped. postgres uses $DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/test) in a schema of its own, dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-sqlite} runs=${2:-3} secs=${3:-15} conns=${4:-32}
port=${BENCH_PORT:-5311}
cargo build --release --bin supersynk >&2
pg=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
metric() { curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="supersynk_$1" '$1 == m { print $2 }'; }
for run in $(seq "$runs"); do
  dir=$(mktemp -d) schema="bench_logs_$$_$run"
  args=(--bind 127.0.0.1 --port "$port" --log warn --data-dir "$dir")
  if [ "$store" = postgres ]; then
    psql "$pg" -qc "CREATE SCHEMA $schema"
    args+=(--database-url "$pg?options=-csearch_path%3D$schema")
  fi
  ./target/release/supersynk "${args[@]}" & pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.05; done
  node --experimental-websocket -e "const ws = new WebSocket('ws://127.0.0.1:$port/logs/listen'); let n = 0;
    ws.onmessage = (m) => { n += JSON.parse(m.data).length; };
    setInterval(() => ws.readyState === 1 && ws.send('ping'), 3000);
    process.on('SIGTERM', () => { console.error('listener received ' + n + ' entries'); process.exit(0); });" &
  listener=$!
  sleep 0.5
  r0=$(metric logs_received_total) s0=$(metric logs_stored_total)
  out=$(wrk -t2 -c"$conns" -d"${secs}s" -s bench/logs_add.lua "http://127.0.0.1:$port/logs/add")
  r1=$(metric logs_received_total) s1=$(metric logs_stored_total)
  t0=$(date +%s.%N)
  while [ "$(metric logs_stored_total)" != "$r1" ] && [ "$(metric logs_store_dropped_total)" = 0 ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  rps=$(echo "$out" | awk '/Requests\/sec/ { print $2 }')
  lat=$(echo "$out" | awk '/Latency/ { print $2 " avg, " $4 " max" }')
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
  awk -v run="$run" -v store="$store" -v rps="$rps" -v r="$((r1 - r0))" -v s="$((s1 - s0))" -v secs="$secs" \
    -v t0="$t0" -v t1="$t1" -v d="$(metric logs_store_dropped_total)" -v lat="$lat" -v rss="$rss" \
    'BEGIN { printf "%s run %d: %.0f req/s (latency %s), %.0f entries/s accepted, %.0f entries/s stored during the run, store caught up %.2f s later, %d dropped, server RSS %.0f MiB\n",
             store, run, rps, lat, r / secs, s / secs, t1 - t0, d, rss / 1024 }'
  kill "$listener" 2>/dev/null || true; wait "$listener" 2>/dev/null || true
  kill "$pid"; wait "$pid" || true
  [ "$store" = postgres ] && psql "$pg" -qc "DROP SCHEMA $schema CASCADE"
  rm -rf "$dir"
done
