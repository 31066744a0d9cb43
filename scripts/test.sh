#!/usr/bin/env bash
# Runs every test of the project on this machine, installing what the tests need.
#   scripts/test.sh            all tests, then the Autobahn conformance suite when Python 2.7 exists
#   SKIP_AUTOBAHN=1 SKIP_FUZZ=1 scripts/test.sh   only the Rust tests
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
phase() { echo "== test.sh: $1 ($((SECONDS - start)) s in)"; }

phase deps

# Redis, nginx and docker-compose for the cluster, proxy and deployment tests.
bash scripts/deps.sh

# The Autobahn client (pip, mostly downloads) installs while the tests run.
if [[ -z ${SKIP_AUTOBAHN:-} ]]; then
  wstest_path=$(mktemp)
  bash ../shared/tools/autobahn-setup.sh >"$wstest_path" 2>/tmp/autobahn-setup.log &
  setup=$!
fi

phase "cargo test"
cargo test --all-targets

# The TypeScript client of the reliable protocol: Node tests and a headless Chromium test.
phase "TypeScript client"
bash scripts/ts-test.sh

# Fuzz targets, bounded (FUZZ_SECONDS each); SKIP_FUZZ=1 skips them.
if [[ -z ${SKIP_FUZZ:-} ]]; then
  phase fuzz
  FUZZ_SECONDS=${FUZZ_SECONDS:-20} scripts/fuzz.sh
fi

if [[ -n ${SKIP_AUTOBAHN:-} ]]; then
  echo "autobahn: skipped (SKIP_AUTOBAHN set)"
elif wait "$setup" && wstest=$(cat "$wstest_path") && [[ -n $wstest ]]; then
  phase autobahn
  scripts/autobahn.sh "$wstest"
else
  echo "autobahn: skipped, no CPython 2.7 on this machine (see /tmp/autobahn-setup.log)"
fi
phase done
