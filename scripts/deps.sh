#!/usr/bin/env bash
# Installs and starts what the tests need beyond Rust, where it is missing (Debian/Ubuntu):
# a Redis server on 127.0.0.1:6379 (cluster tests), nginx (the proxy test) and
# docker-compose (to validate docker-compose.yml without a Docker engine), PostgreSQL on
# 127.0.0.1:5432 (the PostgreSQL store's tests), Debian's Chromium and the npm package
# playwright-core that drives it (the browser tests in tests/browser/), and promtool (from
# Debian's prometheus package: it checks /metrics).
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null || need+=(nginx)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need+=(docker-compose)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v promtool >/dev/null || need+=(prometheus)
if ((${#need[@]})); then
  echo "deps: installing ${need[*]}" >&2
  sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  # Packages must not start services here (nginx would take port 80): a policy-rc.d
  # for the install, removed afterwards if it was ours.
  ours=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    ours=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  [[ -z $ours ]] || $sudo rm -f /usr/sbin/policy-rc.d
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "deps: starting redis-server on 127.0.0.1:6379" >&2
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null

# PostgreSQL: the tests use database "test" as user postgres, without a password.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "deps: starting PostgreSQL on 127.0.0.1:5432" >&2
  sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
  version=$(ls /etc/postgresql | sort -n | tail -1)
  conf=/etc/postgresql/$version/main
  grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf" ||
    sed -i '1i host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"
  $sudo pg_ctlcluster "$version" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null

# playwright-core for the browser tests (it drives /usr/bin/chromium; no browser download).
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
