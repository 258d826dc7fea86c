#!/usr/bin/env bash
# Install the system packages the gateway and its tests need, if they are missing.
# Usage: scripts/system-deps.sh [run|test|bench]   (what the caller is about to do)
set -euo pipefail
purpose=${1:-run}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || need+=(libmagic1)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$purpose" = test ] || [ "$purpose" = bench ]; then
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v curl >/dev/null 2>&1 || need+=(curl)
fi
if [ "$purpose" = bench ]; then
  command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi

[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages: ${need[*]}" >&2
  echo "Install them as root:  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "Installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# prometheus pulls in a service we never start; --no-install-recommends keeps it small.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install; the gateway and the tests start their own.
for svc in redis-server prometheus nginx; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
