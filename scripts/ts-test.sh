#!/usr/bin/env bash
# The TypeScript client's tests (clients/ts): builds the server and the client, checks the
# client's types in a Node-only project, runs the Node tests against the real server, then
# the browser test in headless Chromium. Installs
# Chromium (through scripts/deps.sh) where it is missing, and the npm packages from the lock
# file.
#   scripts/ts-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Chromium and the services, where missing (idempotent; scripts/test.sh ran it already).
bash scripts/deps.sh

cargo build --bin supersynk
# The tests start this binary: the one just built, wherever CARGO_TARGET_DIR puts it.
target=${CARGO_TARGET_DIR:-target}
[[ $target == /* ]] || target=$PWD/$target
export SUPERSYNK_BIN=$target/debug/supersynk
cd clients/ts
npm ci --no-audit --no-fund
npm run build
# The published types compile in a Node-only project (no DOM lib).
npm run test:types
npm test
npm run test:examples
npm run test:browser
