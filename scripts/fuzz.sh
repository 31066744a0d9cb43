#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS each, default 30).
# A crash is copied into fuzz/regressions/<target>/, which tests/fuzz_regressions.rs replays,
# and fails the run. cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP lets this machine's
# stable toolchain accept them.
# The targets are built with the dev profile (its hot dependencies optimized, see
# fuzz/Cargo.toml): a bounded CI run builds in a third of the time of a release build and
# still makes 2,000 to 4,500 runs a second. FUZZ_RELEASE=1 builds them optimized for a
# long run (ten times the runs a second).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
profile=--dev
[[ -z ${FUZZ_RELEASE:-} ]] || profile=--release
status=0
for target in message inflate frames frontends bodies; do
  mkdir -p "fuzz/corpus/$target"
  cp -n fuzz/regressions/$target/* "fuzz/corpus/$target/" 2>/dev/null || true
  if ! cargo fuzz run $profile "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
      >"fuzz/$target.log" 2>&1; then
    tail -40 "fuzz/$target.log"
    for crash in fuzz/artifacts/$target/*; do
      [[ -f $crash ]] && cp "$crash" "fuzz/regressions/$target/" && echo "fuzz: $target crashed: kept $(basename "$crash")"
    done
    status=1
  else
    echo "fuzz: $target: $(grep -Eo 'Done [0-9]+ runs' "fuzz/$target.log" | tail -1) in ${seconds}s, no crash"
  fi
done
exit $status
