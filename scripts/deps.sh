#!/usr/bin/env bash
# Installs and starts what the tests need beyond Rust, where it is missing (Debian/Ubuntu):
# a Redis server on 127.0.0.1:6379 (cluster tests), nginx (the proxy test) and
# docker-compose (to validate docker-compose.yml without a Docker engine).
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null || need+=(nginx)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need+=(docker-compose)
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
