#!/usr/bin/env bash
# Runs every test of the project on this machine, installing what the tests need.
#   scripts/test.sh            all tests, then the Autobahn conformance suite when Python 2.7 exists
#   SKIP_AUTOBAHN=1 SKIP_FUZZ=1 scripts/test.sh   only the Rust tests
set -euo pipefail
cd "$(dirname "$0")/.."

# Redis, nginx and docker-compose for the cluster, proxy and deployment tests.
bash scripts/deps.sh

cargo test --all-targets

# The TypeScript client of the reliable protocol: Node tests and a headless Chromium test.
bash scripts/ts-test.sh

# Fuzz targets, bounded (FUZZ_SECONDS each); SKIP_FUZZ=1 skips them.
if [[ -z ${SKIP_FUZZ:-} ]]; then
  FUZZ_SECONDS=${FUZZ_SECONDS:-20} scripts/fuzz.sh
fi

if [[ -n ${SKIP_AUTOBAHN:-} ]]; then
  echo "autobahn: skipped (SKIP_AUTOBAHN set)"
elif wstest=$(bash ../shared/tools/autobahn-setup.sh 2>/tmp/autobahn-setup.log); then
  scripts/autobahn.sh "$wstest"
else
  echo "autobahn: skipped, no CPython 2.7 on this machine (see /tmp/autobahn-setup.log)"
fi
