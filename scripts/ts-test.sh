#!/usr/bin/env bash
# The TypeScript client's tests (clients/ts): builds the server and the client, runs the Node
# tests against the real server, then the browser test in headless Chromium. Installs
# Chromium (through scripts/deps.sh) where it is missing, and the npm packages from the lock
# file.
#   scripts/ts-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Chromium and the services, where missing (idempotent; scripts/test.sh ran it already).
bash scripts/deps.sh

cargo build --bin supersynk
cd clients/ts
npm ci --no-audit --no-fund
npm run build
npm test
npm run test:browser
