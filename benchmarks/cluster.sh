#!/usr/bin/env bash
# The platform as a cluster (issue 13): NODES broker nodes (`fleet-service broker`) and one
# replica (`fleet-service api`) on a nats-server and a PostgreSQL database of their own. N mTLS
# devices (ids sim-...) spread over the nodes (device i on node i mod NODES) subscribe to their
# commands and publish QoS 1 telemetry at RATE msg/s for DURATION s; a backend observer on
# node 1 watches devices/+/telemetry, so with NODES > 1 two thirds of what it sees crossed the
# backbone. Prints one markdown row: acknowledged and observed messages, PUBACK p50/p99 (the
# PUBACK waits for JetStream's ack), observer end-to-end p50/p99, the CPU seconds per 1,000
# messages of all our processes and of the nats-server, and RSS per device per node.
#
#   cargo build --release -p fleet-service -p device-client
#   NODES=1 N=3000 benchmarks/cluster.sh
#   NODES=3 N=3000 benchmarks/cluster.sh
#
# Settings: NODES (3), N (3000), RATE (1), DURATION (30), CONCURRENCY (50),
# PG (postgres://postgres@127.0.0.1:5432), NATS_SERVER (nats-server), D (/tmp/cluster-bench/
# NODES-N). Ports: 47000 + k for everything it starts. The machine's NATS (4222) and
# PostgreSQL databases other than the one it creates are never touched.
set -u
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/.." && pwd); B=$ROOT/target/release
NODES=${NODES:-3}; N=${N:-3000}; RATE=${RATE:-1}; DURATION=${DURATION:-30}; CONCURRENCY=${CONCURRENCY:-50}
PG=${PG:-postgres://postgres@127.0.0.1:5432}; NATS_SERVER=${NATS_SERVER:-nats-server}
D=${D:-/tmp/cluster-bench/$NODES-$N}; rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
DC=$B/device-client; FS=$B/fleet-service
[ -x "$DC" ] && [ -x "$FS" ] || { echo "build first: cargo build --release -p fleet-service -p device-client"; exit 1; }
ulimit -n 20000 || { echo "cannot raise the open-file limit to 20000"; exit 1; }
PIDS=()
cleanup() { for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2> /dev/null; done; wait 2> /dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
cpu_s() { awk '{printf "%.2f\n", ($14 + $15) / 100}' /proc/$1/stat; }
rss_kib() { awk '/^VmRSS/{print $2}' /proc/$1/status; }

NATS_PORT=47222
$NATS_SERVER -js -a 127.0.0.1 -p $NATS_PORT -sd "$D/nats" > nats.log 2>&1 & NATS_PID=$!; PIDS+=($NATS_PID)
DB=bench_cluster_$$
psql "$PG/postgres" -qc "CREATE DATABASE $DB" > /dev/null || exit 1
export FLEET_DATABASE_URL=$PG/$DB FLEET_NATS_URL=nats://127.0.0.1:$NATS_PORT FLEET_DATA_DIR=$D/data
export FLEET_CONFIG=$ROOT/config/cluster.toml RUST_LOG=${RUST_LOG:-warn}
HTTP=47080
$FS api --node-id api-1 --http-listen 127.0.0.1:$HTTP > api-1.log 2>&1 & API_PID=$!; PIDS+=($API_PID)
until curl -sf http://127.0.0.1:$HTTP/api/v1/health > /dev/null; do
  kill -0 $API_PID 2> /dev/null || { echo "the replica did not start:"; cat api-1.log; exit 1; }; sleep 0.2
done
NODE_PIDS=(); URLS=()
for k in $(seq 1 "$NODES"); do
  M=$((47000 + 10 * k)); S=$((M + 1)); W=$((M + 2))
  $FS broker --node-id node-$k --mqtts-listen 127.0.0.1:$M --service-listen 127.0.0.1:$S \
    --http-listen 127.0.0.1:$W > node-$k.log 2>&1 & NODE_PIDS+=($!); PIDS+=($!)
  until curl -sf http://127.0.0.1:$W/healthz > /dev/null; do
    kill -0 ${NODE_PIDS[-1]} 2> /dev/null || { echo "node $k did not start:"; cat node-$k.log; exit 1; }; sleep 0.2
  done
  URLS+=(--url mqtts://127.0.0.1:$M)
done
API=http://127.0.0.1:$HTTP/api/v1
. "$HERE/jitp-ca.sh"
sleep 1

RSS0=(); for p in "${NODE_PIDS[@]}"; do RSS0+=("$(rss_kib "$p")"); done
TLS=("${URLS[@]}" --server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
OBS=(--observe-url mqtt://127.0.0.1:47011 --observe-username svc)
export DEVICE_CLIENT_OBSERVE_PASSWORD; DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token)
CPU0=0; for p in "${NODE_PIDS[@]}" $API_PID; do CPU0=$(echo "$CPU0 + $(cpu_s $p)" | bc); done; NCPU0=$(cpu_s $NATS_PID)
$DC simulate telemetry "${TLS[@]}" --devices $N --concurrency $CONCURRENCY --qos 1 --rate $RATE \
  --duration ${DURATION}s --subscribe-commands "${OBS[@]}" --max-duration $((DURATION + 600))s --json > run.json 2> run.err
CPU1=0; for p in "${NODE_PIDS[@]}" $API_PID; do CPU1=$(echo "$CPU1 + $(cpu_s $p)" | bc); done; NCPU1=$(cpu_s $NATS_PID)
RSS_PER=(); i=0; for p in "${NODE_PIDS[@]}"; do
  RSS_PER+=("$(( ($(rss_kib "$p") - ${RSS0[$i]}) * NODES / N ))"); i=$((i + 1)); done
ACK=$(jq '.telemetry.acked // 0' run.json)
CPU=$(echo "scale=2; ($CPU1 - $CPU0) * 1000 / ($ACK + 1)" | bc); NCPU=$(echo "scale=2; ($NCPU1 - $NCPU0) * 1000 / ($ACK + 1)" | bc)
echo "| Nodes | Devices | Sent / acked / observed | Steady PUBACK p50 / p99 ms | Observer end-to-end p50 / p99 ms | CPU s per 1,000 msgs (ours / nats-server) | RSS KiB per device, per node |"
echo "|---|---|---|---|---|---|---|"
jq -r --arg nodes "$NODES" --arg n "$N" --arg cpu "$CPU" --arg ncpu "$NCPU" --arg rss "${RSS_PER[*]}" \
  '.telemetry as $t | "| \($nodes) | \($n) | \($t.sent // 0) / \($t.acked // 0) / \($t.observer.delivered // 0) | \($t.later_puback_latency.p50_ms // "-") / \($t.later_puback_latency.p99_ms // "-") | \($t.observer.latency.p50_ms // "-") / \($t.observer.latency.p99_ms // "-") | \($cpu) / \($ncpu) | \($rss) |"' run.json
echo
echo "(run files in $D; report in run.json)"
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" > /dev/null 2>&1
