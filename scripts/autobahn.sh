#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client against supersynk's echo endpoint and checks
# that every case is OK, NON-STRICT or INFORMATIONAL. Needs wstest (Python 2.7):
# ../shared/tools/autobahn-setup.sh installs it and prints its path.
# Usage: scripts/autobahn.sh [path/to/wstest]
set -euo pipefail
cd "$(dirname "$0")/.."
wstest=${1:-$(bash ../shared/tools/autobahn-setup.sh)}
# The server is the dev build the tests use: its hot dependencies are optimized (see
# Cargo.toml), and the suite's time is almost all wstest's own (single-threaded Python; two
# of them in parallel on this 2-core machine took longer than one).
cargo build --bin supersynk
target=${CARGO_TARGET_DIR:-target}
# The suite sends 1,000 messages back to back per case, and 4 MiB messages in 64-byte
# fragments (9.3.1, 9.4.1: 65,536 frames each and more): lift the per-connection rate and the
# fragment cap (sized for real clients) for this run. Every other case passes at the default
# fragment cap (128).
rm -rf autobahn/reports
"$target/debug/supersynk" --bind 127.0.0.1 --port 9001 --echo-endpoint true \
  --max-message-bytes 16777216 --outbound-queue-bytes 67108864 --log warn \
  --messages-per-second 1000000 --message-burst 1000000 --http-requests-per-second 100000 \
  --max-message-fragments 1048576 ${AUTOBAHN_SERVER_FLAGS:-} &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:9001/healthz >/dev/null && break; sleep 0.1; done
"$wstest" -m fuzzingclient -s autobahn/fuzzingclient.json
cp autobahn/reports/index.json autobahn/index.json
python3 - <<'PY'
import json, sys
index = json.load(open("autobahn/index.json"))["supersynk"]
ok = {"OK", "NON-STRICT", "INFORMATIONAL"}
bad = {c: (r["behavior"], r["behaviorClose"]) for c, r in index.items()
       if r["behavior"] not in ok or r["behaviorClose"] not in ok}
counts = {}
for r in index.values():
    counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
print("autobahn:", len(index), "cases", counts)
if bad:
    for c, r in sorted(bad.items()):
        print("  FAILED", c, r)
    sys.exit(1)
print(len(index), "passed, 0 failed")
PY
