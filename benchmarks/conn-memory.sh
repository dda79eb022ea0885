#!/usr/bin/env bash
# Server memory per connection: a fresh `fleet-service serve` (release) on 127.0.0.1, by default
# on ports 28883/28884/28080 (MQTTS_PORT, SERVICE_PORT, HTTP_PORT). N devices are provisioned
# (JITP, one connection each) first; then, one state at a time, the N devices connect and stay
# connected, and the server's RSS is read once every connection is established and again after
# they all disconnected. Prints one row per state: RSS, and KiB per device over the RSS after
# provisioning. Bounded: every simulator run stops by itself.
#
#   cargo build --release -p fleet-service -p device-client
#   N=1000 benchmarks/conn-memory.sh
#   SERVE_ENV=MALLOC_ARENA_MAX=2 N=1000 benchmarks/conn-memory.sh
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
N=${N:-1000}; HOLD=${HOLD:-30}; SETTLE=${SETTLE:-8}
MQTTS_PORT=${MQTTS_PORT:-28883}; SERVICE_PORT=${SERVICE_PORT:-28884}; HTTP_PORT=${HTTP_PORT:-28080}
D=${D:-/tmp/conn-memory}; rm -rf "$D/run"; mkdir -p "$D/run"; cd "$D/run"
. "$HERE/platform.sh"
trap 'kill $PID ${SIM:-} 2>/dev/null' EXIT
rss_kib() { awk '/^VmRSS/{print $2}' /proc/$PID/status; }
conns() { ss -Htn state established "( sport = :$MQTTS_PORT )" | wc -l; }
TLS=(--server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
URL=(--url mqtts://127.0.0.1:$MQTTS_PORT)
R_START=$(rss_kib)
# Mint the certificates, then connect every device once so it is provisioned (JITP).
$DC simulate connect-storm "${TLS[@]}" --devices $N --concurrency 1 \
  --url mqtts://127.0.0.1:1 --connect-timeout 1s --max-duration 120s > /dev/null 2>&1
$DC simulate connect-storm "${URL[@]}" "${TLS[@]}" --devices $N --concurrency 100 \
  --max-duration 120s > provision.out 2>&1
sleep 3
BASE=$(rss_kib)
row() { printf '%-44s %8.1f MiB %8.1f KiB/device\n' "$1" "$(echo "$2 / 1024" | bc -l)" \
  "$(echo "($2 - $BASE) / $N" | bc -l)"; }
# state NAME FILE ARGS...: N devices connect (telemetry simulator, ARGS added), RSS read SETTLE
# seconds after all N are established, then again after they all left.
state() {
  local name=$1 out=$2; shift 2
  $DC simulate telemetry "${URL[@]}" "${TLS[@]}" --devices $N --concurrency 100 \
    --duration ${HOLD}s --max-duration $((HOLD + 120))s "$@" > "$out.out" 2>&1 &
  SIM=$!
  until [ "$(conns)" -ge "$N" ] || ! kill -0 $SIM 2> /dev/null; do sleep 0.5; done
  local held=$(conns)
  sleep "$SETTLE"
  row "$name ($held connected)" "$(rss_kib)"
  wait $SIM; SIM=
  until [ "$(conns)" -eq 0 ]; do sleep 0.5; done
  sleep 3
  row "  after they all disconnected" "$(rss_kib)"
}
echo "== server RSS, $N devices (RSS at start $((R_START / 1024)) MiB; after provisioning $((BASE / 1024)) MiB${SERVE_ENV:+; $SERVE_ENV})"
# --rate 0.0001: one publish per device every 10,000 s, offsets spread over that period: idle.
state "idle, no subscription" idle --rate 0.0001
state "idle, subscribed to commands" subscribed --rate 0.0001 --subscribe-commands
state "subscribed, telemetry 1/s QoS 1" telemetry --rate 1 --qos 1 --subscribe-commands
