#!/usr/bin/env bash
# `make run`: a local redis-server, the sample backend, a demo key, and the gateway in front.
# Everything it makes lives under var/; Ctrl-C stops all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p var/spool var/backend-files
CONFIG=${GATEWAY_CONFIG:-config/policies.yaml}
REDIS_PORT=${DEMO_REDIS_PORT:-6379}
BACKEND_PORT=${DEMO_BACKEND_PORT:-8081}
export GATEWAY_REDIS_URL=${GATEWAY_REDIS_URL:-redis://127.0.0.1:${REDIS_PORT}/0}
export GATEWAY_BACKEND_URL=${GATEWAY_BACKEND_URL:-http://127.0.0.1:${BACKEND_PORT}}
# A signing key for the demo, made once and kept in var/ (never commit one).
[ -s var/signing-key ] || head -c 32 /dev/urandom | base64 > var/signing-key
export GATEWAY_SIGNING_KEY=${GATEWAY_SIGNING_KEY:-$(cat var/signing-key)}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "Using the redis-server already answering on port $REDIS_PORT"
else
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir var \
    >var/redis.log 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

$BIN/upload-gateway sample-backend --listen "127.0.0.1:${BACKEND_PORT}" --store var/backend-files \
  >var/backend.log 2>&1 &
backend_pid=$!
pids+=($backend_pid)

# check-config's summary names the addresses in force (the file's, or GATEWAY_*LISTEN's).
SUMMARY=$($BIN/upload-gateway --config "$CONFIG" check-config "$CONFIG")
LISTEN=$(sed -n 's/^  listen \([^,]*\), admin \([^,]*\),.*/\1/p' <<<"$SUMMARY")
ADMIN=$(sed -n 's/^  listen \([^,]*\), admin \([^,]*\),.*/\2/p' <<<"$SUMMARY")
PROXY=http://${LISTEN/#0.0.0.0:/127.0.0.1:}
KEY_JSON=$($BIN/upload-gateway --config "$CONFIG" keys add --client demo --label "make run" --ttl 30d --json)
API_KEY=$($BIN/python -c 'import json,sys; print(json.load(sys.stdin)["api_key"])' <<<"$KEY_JSON")
SECRET=$($BIN/upload-gateway --config "$CONFIG" secret mint --api-key "$API_KEY" --ttl 24h --claim role=agent)
printf '%%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%%%EOF\n' > var/demo.pdf

$BIN/upload-gateway serve --config "$CONFIG" >var/gateway.log 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
up=
# Up when *this* gateway says it listens: another one on the same ports would answer /healthz.
for _ in $(seq 100); do
  grep -q "listening on .*pid ${gateway_pid}\"" var/gateway.log 2>/dev/null && { up=1; break; }
  kill -0 "$gateway_pid" 2>/dev/null || break   # it exited: no point waiting
  sleep 0.1
done
if [ -z "$up" ] || ! kill -0 "$gateway_pid" 2>/dev/null; then
  echo "The gateway did not start (a port in use?); the end of var/gateway.log:" >&2
  tail -n 5 var/gateway.log >&2
  exit 1
fi
if ! kill -0 "$backend_pid" 2>/dev/null; then
  echo "The sample backend did not start (port ${BACKEND_PORT} in use?); the end of var/backend.log:" >&2
  tail -n 5 var/backend.log >&2
  exit 1
fi

cat <<TXT

Upload Gateway is running
  gateway        ${PROXY}        (log: var/gateway.log)
  admin          http://${ADMIN}/metrics /healthz /readyz
  sample backend ${GATEWAY_BACKEND_URL}        (files land in var/backend-files/)
  redis          ${GATEWAY_REDIS_URL}

A demo API key was created for client "demo"; its Secret (valid 24 h, role agent):
  export SECRET='${SECRET}'

Try it:
  curl -sS -H "Authorization: Bearer \$SECRET" -F 'file=@var/demo.pdf' ${PROXY}/streams/42/objects
  curl -sS -H "Authorization: Bearer \$SECRET" ${PROXY}/_gateway/policy/42
  curl -sS -F 'file=@/bin/ls;filename=invoice.pdf' -H "Authorization: Bearer \$SECRET" ${PROXY}/streams/42/objects

Ctrl-C stops everything.
TXT
wait
