#!/usr/bin/env bash
# Runs the benchmark scenarios against a freshly started release server on this machine.
#   bench/run.sh realistic|wide|saturation|idle|http|cluster|reliable|all [extra supersynk-bench flags]
#   bench/run.sh compare [flags]   supersynk against the µWebSockets reference relay (bench/uws/)
#   bench/run.sh ipd [flags]       the server's instructions per delivery (valgrind's callgrind)
# SUPERSYNK_BIN runs another server binary (a build of an earlier commit, to compare).
# Each scenario starts its own server (so RSS figures start from a fresh process), prints
# the bench tool's table, and keeps its JSON in bench/out/<scenario>*.json. `cluster` starts
# two nodes sharing sessions over Redis ($REDIS_URL, default redis://127.0.0.1:6379) under a
# prefix of their own, whose keys it deletes afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
# The server and the bench are two packages of the workspace (the bench's is bench/).
cargo build --release -p supersynk -p supersynk-bench >&2
mkdir -p bench/out
port=${BENCH_PORT:-5301}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
server_pid= node_b_pid= cluster_prefix= cluster_runs=0
# Leaders in the saturation runs push up to 500 times a second: above the default
# per-connection message rate (200/s), which is sized for real clients. Runs of real clients
# (the reliable-loss run) empty this to get the defaults.
node_rates=(--messages-per-second 100000 --message-burst 100000)
# Sessions of 1 leader and 1,000 followers (wide, compare): above the default cap of 256.
wide_members=(--max-session-members 1001)

start_node() { # port, flags...: a release server; its pid in node_pid once /healthz says ok
  local p=$1; shift
  # shellcheck disable=SC2086 # SUPERSYNK_BIN may be a command and its arguments (ipd)
  ${SUPERSYNK_BIN:-./target/release/supersynk} --bind 127.0.0.1 --port "$p" --log warn \
    "${node_rates[@]}" "$@" &
  node_pid=$!
  # "ok" only once connected to Redis in cluster mode ("degraded: ..." before).
  for _ in $(seq "${START_TRIES:-100}"); do [ "$(curl -sf "http://127.0.0.1:$p/healthz")" = ok ] && return; sleep 0.05; done
  kill "$node_pid" 2>/dev/null || true
  echo "server on port $p did not start" >&2; exit 1
}
start_server() { start_node "$port" "$@"; server_pid=$node_pid; }
start_uws() { # the µWebSockets reference relay (bench/uws/relay.js) on $port, in server_pid
  [ -d bench/uws/node_modules/uWebSockets.js ] ||
    (cd bench/uws && npm ci --no-audit --no-fund --loglevel=error) >&2
  node bench/uws/relay.js --port "$port" 2>/dev/null &
  server_pid=$!
  for _ in $(seq 100); do [ "$(curl -sf "http://127.0.0.1:$port/healthz")" = ok ] && return; sleep 0.05; done
  echo "the µWS relay on port $port did not start" >&2; exit 1
}
start_cluster() { # node A on $port (server_pid: the one the bench reports), node B on $port+1
  cluster_prefix="bench-$$-$((cluster_runs += 1)):"
  local redis=(--redis-url "$redis_url" --redis-prefix "$cluster_prefix")
  start_node "$port" "${redis[@]}"; server_pid=$node_pid
  start_node "$((port + 1))" "${redis[@]}"; node_b_pid=$node_pid
}
stop_server() { # the server or both nodes, then the cluster's Redis keys
  local pid
  for pid in $server_pid $node_b_pid; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  server_pid= node_b_pid=
  if [ -n "$cluster_prefix" ]; then
    redis-cli -u "$redis_url" --scan --pattern "$cluster_prefix*" | xargs -r redis-cli -u "$redis_url" del >/dev/null || true
    cluster_prefix=
  fi
}
trap stop_server EXIT

bench() { # name, flags... (the URL is $bench_url if set, else the plugin endpoint)
  local name=$1; shift
  ./target/release/supersynk-bench --url "${bench_url:-ws://127.0.0.1:$port/connect}" --server-pid "$server_pid" "$@" \
    --json >"bench/out/$name.json"
  python3 - "bench/out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["connections_made", "pushes_sent", "deliveries_expected", "deliveries_received",
        "deliveries_lost", "push_rate", "deliveries_per_sec", "latency_p50_ms", "latency_p99_ms", "latency_p999_ms",
        "latency_max_ms", "server_cpu_pct", "server_rss_mib", "bench_cpu_pct", "server_rss_per_connection_kib",
        "requests_sent", "requests_answered", "requests_per_sec", "status_200", "status_204", "status_4xx",
        "status_5xx", "errors", "unanswered", "reconnects", "self_in_answer", "incomplete_answers"]
print(sys.argv[2] + ": " + ", ".join(f"{k}={r[k]}" for k in keys if k in r))
PY
}

redis_cpu() { redis-cli -u "$redis_url" info cpu | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { print s }'; }
cluster_bench() { # name, flags...: bench, then node B's CPU and Redis's over the whole run
  # (connect, warm-up, window, drain; the bench reports node A over the window only), node B's
  # RSS at the end and the nodes' cluster counters
  local name=$1 tck b0 r0 t0 b1 r1 t1 rss
  tck=$(getconf CLK_TCK)
  b0=$(awk '{ print $14 + $15 }' "/proc/$node_b_pid/stat"); r0=$(redis_cpu); t0=$(date +%s.%N)
  bench "$@"
  b1=$(awk '{ print $14 + $15 }' "/proc/$node_b_pid/stat"); r1=$(redis_cpu); t1=$(date +%s.%N)
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$node_b_pid/status")
  awk -v n="$name" -v b="$((b1 - b0))" -v tck="$tck" -v r0="$r0" -v r1="$r1" -v t0="$t0" -v t1="$t1" -v rss="$rss" \
    'BEGIN { printf "%s: node B CPU %.0f%% RSS %.1f MiB, Redis CPU %.0f%% (CPU over the whole run, %.0f s)\n",
             n, b / tck / (t1 - t0) * 100, rss / 1024, (r1 - r0) / (t1 - t0) * 100, t1 - t0 }'
  for p in "$port" "$((port + 1))"; do
    echo "$name: node :$p $(curl -sf "http://127.0.0.1:$p/metrics" |
      awk '/^supersynk_cluster_(forwarded|received|dropped)/ { printf "%s=%s ", substr($1, 19), $2 }')"
  done
}

scenario() {
  case $1 in
    realistic) # 2,500 sessions x 4 players, a push every 170 ms, plugin pings, with deflate
      start_server; bench realistic --sessions 2500 --followers 3 --interval-ms 170 --duration-s 20 \
        --ping-ms 1700 --deflate "${@:2}"; stop_server
      start_server; bench realistic-plain --sessions 2500 --followers 3 --interval-ms 170 --duration-s 20 \
        --ping-ms 1700 "${@:2}"; stop_server ;;
    wide) # 1 leader, 1,000 followers, a push every 10 ms (the session is above the default
      # cap of 256 members, raised for it)
      start_server "${wide_members[@]}"
      bench wide --sessions 1 --followers 1000 --interval-ms 10 --duration-s 20 "${@:2}"; stop_server
      start_server "${wide_members[@]}"
      bench wide-deflate --sessions 1 --followers 1000 --interval-ms 10 --duration-s 20 --deflate "${@:2}"
      stop_server ;;
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
    cluster) # two nodes over Redis; leaders on node A ($port), followers on node B ($port+1)
      local node_a="ws://127.0.0.1:$port/connect" node_b="ws://127.0.0.1:$((port + 1))/connect"
      # (a) 500 sessions x 4 players as the plugin (deflate, pings): every delivery crosses
      # nodes; then the same load on node A only (node B up, idle), then one node without Redis
      local load=(--sessions 500 --followers 3 --interval-ms 170 --duration-s 15 --ping-ms 1700 --deflate)
      start_cluster; cluster_bench cluster-cross "${load[@]}" --follower-url "$node_b" "${@:2}"; stop_server
      start_cluster; cluster_bench cluster-same "${load[@]}" --follower-url "$node_a" "${@:2}"; stop_server
      start_server; bench cluster-single "${load[@]}" "${@:2}"; stop_server
      # (b) rising load across nodes, 20 sessions x 100 followers, until p99 passes 50 ms; then
      # the same from 5 ms on, on one node without Redis, for reference
      local sat=(--sessions 20 --followers 100 --duration-s 10)
      for interval in ${CLUSTER_INTERVALS-20 10 5 2 1 0.5 0.25}; do
        start_cluster
        cluster_bench "cluster-sat-$interval" "${sat[@]}" --interval-ms "$interval" --follower-url "$node_b" "${@:2}"
        stop_server
      done
      for interval in ${CLUSTER_SINGLE_INTERVALS-5 2 1 0.5 0.25}; do
        start_server; bench "cluster-sat-single-$interval" "${sat[@]}" --interval-ms "$interval" "${@:2}"; stop_server
      done ;;
    reliable) # the reliable protocol: rooms of 10 clients, every client publishing ~350 B to its
      # room every 170 ms with acks on (each delivery numbered for its receiver and buffered
      # until acked); 100 rooms (53,000 deliveries/s) and 250 rooms (132,000/s). Each is
      # followed by a HunterPie control run at the same shape and delivery rate: sessions of 1
      # leader + 9 followers, the leader pushing 10 times as often.
      # Then recovery under loss: the TypeScript client on both ends, each through the tests'
      # lossy proxy (3% of frames dropped each way), 600 messages from one to the other, against
      # a server with the default limits (the client paces itself to them); 5 runs.
      local rooms
      for rooms in 100 250; do
        local bench_url="ws://127.0.0.1:$port/v1/reliable"
        start_server; bench "reliable-$rooms" --reliable --sessions "$rooms" --followers 9 --interval-ms 170 \
          --duration-s 15 "${@:2}"; stop_server
        bench_url=
        start_server; bench "reliable-$rooms-control" --sessions "$rooms" --followers 9 --interval-ms 17 \
          --duration-s 15 "${@:2}"; stop_server
      done
      [ -f clients/ts/dist/node.js ] || (cd clients/ts && npm ci --no-audit --no-fund && npm run build) >&2
      local saved_rates=("${node_rates[@]}")
      node_rates=()
      start_server
      node bench/reliable-loss.mjs "ws://127.0.0.1:$port/v1/reliable" 600 0.03 5 bench/out/reliable-loss.json
      stop_server
      node_rates=("${saved_rates[@]}") ;;
    compare) compare "${@:2}" ;;
    ipd) ipd "${@:2}" ;;
    all) for s in realistic wide saturation idle http cluster reliable compare ipd; do scenario "$s" "${@:2}"; done ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}
compare() { # flags...: every compare case against supersynk and the µWS relay, interleaved
  # (a fresh server per run, COMPARE_RUNS runs of each), then the medians and the ratios.
  # COMPARE_CASES picks cases, COMPARE_DURATION_S sets the window of the load cases.
  local runs=${COMPARE_RUNS:-3} secs=${COMPARE_DURATION_S:-10} run entry name peer
  # name|bench flags. No deflate: the µWS relay compresses nothing (the plugin then sends
  # plain text too).
  local cases=(
    "small|--sessions 200 --followers 3 --interval-ms 170 --ping-ms 1700 --duration-s $secs"
    "many|--sessions ${COMPARE_MANY_SESSIONS:-2500} --followers 3 --interval-ms 170 --ping-ms 1700 --duration-s $secs"
    "wide|--sessions 1 --followers 1000 --interval-ms 5 --duration-s $secs"
    "idle|--sessions 1000 --followers 3 --idle --duration-s 2"
  )
  rm -f bench/out/compare-*.json
  for entry in "${cases[@]}"; do
    name=${entry%%|*}
    [[ " ${COMPARE_CASES:-small many wide idle} " == *" $name "* ]] || continue
    for run in $(seq "$runs"); do
      for peer in supersynk uws; do
        if [ "$peer" = uws ]; then start_uws; else start_server "${wide_members[@]}"; fi
        # shellcheck disable=SC2086 # the case's flags are words
        bench "compare-$name-$peer-$run" ${entry#*|} "$@"
        stop_server
      done
    done
  done
  python3 - bench/out <<'PY'
import glob, json, os, statistics, sys
runs = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "compare-*.json"))):
    case, peer, _ = os.path.basename(path)[len("compare-"):-len(".json")].rsplit("-", 2)
    runs.setdefault(case, {}).setdefault(peer, []).append(json.load(open(path)))
def med(rs, f):
    vs = [v for v in (f(r) for r in rs) if v is not None]
    return statistics.median(vs) if vs else None
def cpu_per_delivery(r):  # µs of server CPU per delivery
    cpu, dps = r.get("server_cpu_pct"), r.get("deliveries_per_sec")
    return cpu / 100 * 1e6 / dps if cpu is not None and dps else None
def fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)
def ratio(a, b):
    return None if a is None or not b else a / b
print("| case | peer | runs | deliveries/s | lost | p99 | server CPU | CPU per delivery | RSS per connection |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
summary = []
for case, peers in runs.items():
    figures = {}
    for peer in ("supersynk", "uws"):
        rs = peers.get(peer, [])
        f = figures[peer] = {
            "dps": med(rs, lambda r: r.get("deliveries_per_sec")),
            "lost": med(rs, lambda r: r.get("deliveries_lost")),
            "p99": med(rs, lambda r: r.get("latency_p99_ms")),
            "cpu": med(rs, lambda r: r.get("server_cpu_pct")),
            "cpd": med(rs, cpu_per_delivery),
            "rss": med(rs, lambda r: r.get("server_rss_per_connection_kib")),
        }
        print(f"| {case} | {'µWS' if peer == 'uws' else peer} | {len(rs)} | {fmt(f['dps'], '{:,.0f}')} "
              f"| {fmt(f['lost'], '{:.0f}')} | {fmt(f['p99'], '{:.2f} ms')} | {fmt(f['cpu'], '{:.0f}%')} "
              f"| {fmt(f['cpd'], '{:.2f} µs')} | {fmt(f['rss'], '{:.2f} KiB')} |")
    s, u = figures["supersynk"], figures["uws"]
    summary.append((case, ratio(s["cpd"], u["cpd"]), ratio(s["rss"], u["rss"])))
print()
for case, cpd, rss in summary:
    parts = []
    if cpd is not None:
        parts.append(f"CPU per delivery supersynk/µWS = {cpd:.2f}")
    if rss is not None:
        parts.append(f"RSS per connection supersynk/µWS = {rss:.2f}")
    print(f"ratio {case}: " + ("; ".join(parts) or "none (figures missing)"))
PY
}

ipd() { # flags...: the instructions the server executes per delivery, counted by callgrind
  # on a fixed workload (4 sessions x 50 followers, a push every 50 ms for 3 s): the run's
  # instructions minus those of the same connections held idle as long, over the deliveries;
  # IPD_RUNS pairs of runs (default 3), their median. Instruction counts do not move with
  # the machine's load as CPU time does; what still moves them is how the two runtime
  # threads, serialized by valgrind, batch the writes.
  command -v valgrind >/dev/null || { echo "ipd needs valgrind (apt-get install valgrind)" >&2; exit 1; }
  local run kind out
  rm -f bench/out/ipd-*.json bench/out/ipd-*.callgrind
  for run in $(seq "${IPD_RUNS:-3}"); do
    for kind in idle load; do
      out="bench/out/ipd-$kind-$run.callgrind"
      SUPERSYNK_BIN="valgrind --tool=callgrind --callgrind-out-file=$out ./target/release/supersynk" \
        START_TRIES=1200 start_server "${wide_members[@]}"
      if [ "$kind" = idle ]; then
        bench "ipd-idle-$run" --sessions 4 --followers 50 --idle --duration-s 3 "$@"
      else
        bench "ipd-load-$run" --sessions 4 --followers 50 --interval-ms 50 --warmup-s 0 --duration-s 3 \
          --drain-s 20 "$@"
      fi
      stop_server
    done
  done
  python3 - bench/out <<'PY'
import glob, json, os, re, statistics, sys
def instructions(path):
    for line in open(path):
        m = re.match(r"^(?:summary|totals): (\d+)", line)
        if m:
            return int(m.group(1))
    raise SystemExit(f"no instruction total in {path}")
out, figures = sys.argv[1], []
for load in sorted(glob.glob(os.path.join(out, "ipd-load-*.callgrind"))):
    run = load[len(os.path.join(out, "ipd-load-")):-len(".callgrind")]
    idle = instructions(os.path.join(out, f"ipd-idle-{run}.callgrind"))
    busy = instructions(load)
    r = json.load(open(os.path.join(out, f"ipd-load-{run}.json")))
    n = r["deliveries_received_total"]
    figures.append((busy - idle) / max(n, 1))
    print(f"ipd run {run}: {busy:,} instructions with pushes, {idle:,} idle; {n:,} deliveries "
          f"({r['deliveries_lost']} lost): {figures[-1]:,.0f} per delivery")
print(f"ipd: {statistics.median(figures):,.0f} instructions per delivery (median of {len(figures)}; "
      f"{min(figures):,.0f} to {max(figures):,.0f})")
PY
}

scenario "${1:-all}" "${@:2}"
