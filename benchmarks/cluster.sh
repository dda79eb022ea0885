#!/usr/bin/env bash
# The platform as a cluster (issue 13): NODES broker nodes (`fleet-service broker`) and REPLICAS
# replicas (`fleet-service api`) on a nats-server and a PostgreSQL database of their own. N mTLS
# devices (ids sim-...) spread over the nodes (device i on node i mod NODES) subscribe to their
# commands and publish QoS 1 telemetry at RATE msg/s for DURATION s; a backend observer on
# node 1 watches devices/+/telemetry, so with NODES > 1 two thirds of what it sees crossed the
# backbone. The simulator runs as SHARDS processes (one process holds at most ~19,000
# connections here); the observer is shard 1's and checks shard 1's devices (the others' are
# "foreign" to it), spread over every node. Prints one markdown row: acknowledged and observed
# messages, PUBACK p50/p99 (the PUBACK waits for JetStream's ack), observer end-to-end p50/p99,
# the CPU seconds per 1,000 messages of all our processes and of the nats-server, and RSS per
# device per node.
#
# KILLS=1 runs the failure scenario instead (two replicas; the devices run `simulate soak`
# without churn, so a device whose session is lost reconnects, moving to the next node when its
# own is gone): at 1/4 of DURATION it kills -9 replica 2, at 2/4 node NODES, at 3/4 the
# nats-server (restarted RESTART_AFTER s later). It prints how long each took to recover:
# the intake's backlog (JetStream consumer `intake`: pending + unacknowledged) back under its
# level before the kills; the killed node's sessions declared `node_lost`; every device
# connected again; PUBACKs flowing again after the nats-server came back. The surviving nodes
# must hold the killed one's devices: one process holds at most ~19,000 connections here, so
# 50,000 devices take four nodes (12,500 each, 16,667 after the kill).
#
#   cargo build --release -p fleet-service -p device-client
#   NODES=1 N=3000 benchmarks/cluster.sh
#   NODES=3 N=3000 benchmarks/cluster.sh
#   NODES=3 N=50000 RATE=0.02 DURATION=120 benchmarks/cluster.sh
#   KILLS=1 NODES=4 N=50000 RATE=0.02 DURATION=300 benchmarks/cluster.sh
#
# Settings: NODES (3), N (3000), RATE (1), DURATION (30), CONCURRENCY (50 per shard), SHARDS
# (N / 17,000 rounded up), KILLS (0), REPLICAS (1, 2 with KILLS), RESTART_AFTER (5),
# PG (postgres://postgres@127.0.0.1:5432), NATS_SERVER (nats-server), D (/tmp/cluster-bench/
# NODES-N). Ports: 47000 + k for everything it starts. The machine's NATS (4222) and
# PostgreSQL databases other than the one it creates are never touched.
set -u
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/.." && pwd); B=$ROOT/target/release
NODES=${NODES:-3}; N=${N:-3000}; RATE=${RATE:-1}; DURATION=${DURATION:-30}; CONCURRENCY=${CONCURRENCY:-50}
SHARDS=${SHARDS:-$(( (N + 16999) / 17000 ))}; KILLS=${KILLS:-0}; RESTART_AFTER=${RESTART_AFTER:-5}
if [ "$KILLS" = 1 ]; then REPLICAS=${REPLICAS:-2}; else REPLICAS=${REPLICAS:-1}; fi
PG=${PG:-postgres://postgres@127.0.0.1:5432}; NATS_SERVER=${NATS_SERVER:-nats-server}
D=${D:-/tmp/cluster-bench/$NODES-$N}; rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
DC=$B/device-client; FS=$B/fleet-service
[ -x "$DC" ] && [ -x "$FS" ] || { echo "build first: cargo build --release -p fleet-service -p device-client"; exit 1; }
[ "$KILLS" = 1 ] && { [ "$NODES" -ge 2 ] && [ "$REPLICAS" -ge 2 ] || { echo "KILLS=1 needs NODES >= 2 and REPLICAS >= 2"; exit 1; }; }
ulimit -n 20000 || { echo "cannot raise the open-file limit to 20000"; exit 1; }
PIDS=()
cleanup() { for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2> /dev/null; done; wait 2> /dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
cpu_s() { awk '{printf "%.2f\n", ($14 + $15) / 100}' /proc/$1/stat 2> /dev/null || echo 0; }
rss_kib() { awk '/^VmRSS/{print $2}' /proc/$1/status; }
now() { date +%s.%N; }
since() { echo "scale=1; ($(now) - $1) / 1" | bc; }

NATS_PORT=47222; NATS_MON=47822
start_nats() {
  $NATS_SERVER -js -a 127.0.0.1 -p $NATS_PORT -m $NATS_MON -sd "$D/nats" >> nats.log 2>&1 & NATS_PID=$!; PIDS+=($NATS_PID)
}
start_nats
DB=bench_cluster_$$
psql "$PG/postgres" -qc "CREATE DATABASE $DB" > /dev/null || exit 1
export FLEET_DATABASE_URL=$PG/$DB FLEET_NATS_URL=nats://127.0.0.1:$NATS_PORT FLEET_DATA_DIR=$D/data
export FLEET_CONFIG=$ROOT/config/cluster.toml RUST_LOG=${RUST_LOG:-warn}
API_PIDS=()
for r in $(seq 1 "$REPLICAS"); do
  HTTP=$((47080 + r - 1))
  $FS api --node-id api-$r --http-listen 127.0.0.1:$HTTP > api-$r.log 2>&1 & API_PIDS+=($!); PIDS+=($!)
  until curl -sf http://127.0.0.1:$HTTP/api/v1/health > /dev/null; do
    kill -0 ${API_PIDS[-1]} 2> /dev/null || { echo "replica $r did not start:"; cat api-$r.log; exit 1; }; sleep 0.2
  done
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
API=http://127.0.0.1:47080/api/v1
. "$HERE/jitp-ca.sh"
sleep 1

# Node k's metric (sessions_open, bus_pending, ...), empty while it does not answer.
node_metric() { curl -s -m 1 "http://127.0.0.1:$((47000 + 10 * $1 + 2))/api/v1/broker/metrics" | jq -r ".$2 // empty" 2> /dev/null; }
# The intake's backlog: events in the stream it has not been given, plus given and not acked.
intake_backlog() {
  curl -s -m 1 "http://127.0.0.1:$NATS_MON/jsz?consumers=true" 2> /dev/null | jq -r \
    '[.account_details[]?.stream_detail[]?.consumer_detail[]? | select(.name == "intake") | .num_pending + .num_ack_pending] | first // empty' 2> /dev/null
}
node_lost() { psql -qtA "$PG/$DB" -c "SELECT count(*) FROM device_sessions WHERE end_reason = 'node_lost'" 2> /dev/null; }
connected_total() { local t=0 k v; for k in "$@"; do v=$(node_metric "$k" sessions_open); t=$((t + ${v:-0})); done; echo $t; }

RSS0=(); for p in "${NODE_PIDS[@]}"; do RSS0+=("$(rss_kib "$p")"); done
TLS=("${URLS[@]}" --server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
OBS=(--observe-url mqtt://127.0.0.1:47011 --observe-username svc)
export DEVICE_CLIENT_OBSERVE_PASSWORD; DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token)
# Mint the certificates first (nothing listens on port 1), so the run measures connecting.
$DC simulate connect-storm --url mqtts://127.0.0.1:1 --server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem \
  --ca-key mfg-ca.key --cert-cache certs --devices $N --concurrency 1 --connect-timeout 1s \
  --max-duration 900s > /dev/null 2>&1
if [ "$KILLS" = 1 ]; then
  SIM=("$DC" simulate soak "${TLS[@]}" --devices $N --concurrency $CONCURRENCY --qos 1 --rate $RATE
    --duration ${DURATION}s --churn-per-min 0 --report-every 10s --reconnect-delay 200ms
    --reconnect-jitter 2s --subscribe-commands --max-duration $((DURATION + 900))s --json)
else
  SIM=("$DC" simulate telemetry "${TLS[@]}" --devices $N --concurrency $CONCURRENCY --qos 1 --rate $RATE
    --duration ${DURATION}s --subscribe-commands --max-duration $((DURATION + 900))s --json)
fi
ALL_PIDS=("${NODE_PIDS[@]}" "${API_PIDS[@]}")
CPU0=0; for p in "${ALL_PIDS[@]}"; do CPU0=$(echo "$CPU0 + $(cpu_s $p)" | bc); done; NCPU0=$(cpu_s $NATS_PID)
SIMS=()
for K in $(seq 1 "$SHARDS"); do
  if [ "$K" = 1 ]; then O=("${OBS[@]}"); else O=(); fi
  "${SIM[@]}" ${O[@]+"${O[@]}"} --shard "$K/$SHARDS" > "run-$K.json" 2> "run-$K.err" & SIMS+=($!)
done

if [ "$KILLS" = 1 ]; then
  # Wait for every device (and the observer) to connect and publish, then note the steady
  # intake backlog.
  until [ "$(connected_total $(seq 1 "$NODES"))" -ge $((N + 1)) ]; do sleep 1; done
  sleep $((DURATION / 8))
  BASE=0; for _ in $(seq 1 10); do b=$(intake_backlog); [ "${b:-0}" -gt "$BASE" ] && BASE=${b:-0}; sleep 0.5; done
  LIMIT=$((BASE + 2 * N / 100 + 100))
  # Blocks until the intake's backlog is under LIMIT (nothing to catch up beyond the usual).
  backlog_recovered() { local t0=$1 b; while :; do b=$(intake_backlog); [ -n "$b" ] && [ "$b" -le "$LIMIT" ] && break; sleep 0.25; done; since "$t0"; }
  T_START=$(now)
  sleep_until() { local at; at=$(echo "$T_START + $1" | bc); while [ "$(echo "$(now) < $at" | bc)" = 1 ]; do sleep 0.2; done; }
  R=()
  sleep_until $((DURATION / 4))
  T0=$(now); kill -9 "${API_PIDS[1]}"; sleep 5
  R+=("| kill -9 replica 2 | intake backlog back under $LIMIT (its level before, $BASE, plus 2 % of the devices) | $(backlog_recovered "$T0") s |")
  sleep_until $((DURATION / 2))
  VICTIM=$NODES; LIVE=$(seq 1 $((NODES - 1)))
  HELD=$(node_metric "$VICTIM" sessions_open); LOST0=$(node_lost)
  T0=$(now); kill -9 "${NODE_PIDS[$((VICTIM - 1))]}"
  T_ALL=""; T_LOST=""; T_BACKLOG=""; ROSE=0
  while [ -z "$T_ALL" ] || [ -z "$T_LOST" ] || [ -z "$T_BACKLOG" ]; do
    [ -z "$T_ALL" ] && [ "$(connected_total $LIVE)" -ge $((N + 1)) ] && T_ALL=$(since "$T0")
    [ -z "$T_LOST" ] && [ "$(( $(node_lost) - LOST0 ))" -ge "$HELD" ] && T_LOST=$(since "$T0")
    if [ -z "$T_BACKLOG" ]; then
      b=$(intake_backlog); [ -n "$b" ] && [ "$b" -gt "$LIMIT" ] && ROSE=1
      [ -n "$b" ] && [ "$b" -le "$LIMIT" ] && { [ $ROSE = 1 ] || [ "$(echo "$(since "$T0") > 5" | bc)" = 1 ]; } && T_BACKLOG=$(since "$T0")
    fi
    [ "$(echo "$(since "$T0") > 300" | bc)" = 1 ] && break
    sleep 0.25
  done
  R+=("| kill -9 node $VICTIM (held $HELD devices) | every device connected again on the other nodes | ${T_ALL:-over 300} s |")
  R+=("| | the $HELD sessions it held ended \`node_lost\` | ${T_LOST:-over 300} s |")
  R+=("| | intake backlog back under $LIMIT | ${T_BACKLOG:-over 300} s |")
  sleep_until $((3 * DURATION / 4))
  T0=$(now); kill -9 "$NATS_PID"; sleep "$RESTART_AFTER"; start_nats; T1=$(now)
  until [ "$(for k in $LIVE; do node_metric "$k" bus_pending; done | awk '{s += $1} END {print s + 0}')" = 0 ] \
    && [ -n "$(intake_backlog)" ]; do sleep 0.25; done
  R+=("| kill -9 the nats-server, restarted after $RESTART_AFTER s | PUBACKs flowing again (nodes' \`bus_pending\` 0), after the restart | $(since "$T1") s |")
  R+=("| | intake backlog back under $LIMIT, after the restart | $(backlog_recovered "$T1") s |")
  ALL_PIDS=("${NODE_PIDS[@]:0:$((NODES - 1))}" "${API_PIDS[0]}")
fi
wait "${SIMS[@]}"
# Only shard 1 observes, so the shards' reports do not merge (`simulate merge` wants the same
# parameters): sums of the counts, shard 1's observer, each percentile as the shards' range.
jq -s '{telemetry: {
    sent: (map(.telemetry.sent) | add), acked: (map(.telemetry.acked) | add),
    observer: .[0].telemetry.observer,
    puback: (map(.telemetry.later_puback_latency // .telemetry.puback_latency)),
  }, churn: (map(.churn) | if .[0] == null then null else {
    lost_sessions: (map(.lost_sessions) | add), reconnects: (map(.reconnects) | add),
    reconnect_failures: (map(.reconnect_failures) | add),
    lost_reasons: (map(.lost_reasons | to_entries) | add | group_by(.key) | map({(.[0].key): (map(.value) | add)}) | add) } end)}' \
  $(ls run-*.json | sort -V) > run.json
range() { jq -r ".telemetry.puback | map(.$1) | if min == max then \"\(min)\" else \"\(min)-\(max)\" end" run.json; }
CPU1=0; for p in "${ALL_PIDS[@]}"; do CPU1=$(echo "$CPU1 + $(cpu_s $p)" | bc); done; NCPU1=$(cpu_s $NATS_PID)
RSS_PER=(); i=0; for p in "${NODE_PIDS[@]}"; do
  if [ -e /proc/$p ]; then RSS_PER+=("$(( ($(rss_kib "$p") - ${RSS0[$i]}) * NODES / N ))"); else RSS_PER+=("-"); fi; i=$((i + 1)); done
ACK=$(jq '.telemetry.acked // 0' run.json)
if [ "$KILLS" = 1 ]; then
  jq -r --arg p50 "$(range p50_ms)" --arg p99 "$(range p99_ms)" '.telemetry as $t | .churn as $c | "sent \($t.sent) / acked \($t.acked) / observer delivered \($t.observer.delivered // 0) (of shard 1), lost \($t.observer.lost // "-"); sessions lost \($c.lost_sessions) \($c.lost_reasons | tostring), reconnects \($c.reconnects) (failed \($c.reconnect_failures)); PUBACK p50 / p99 \($p50) / \($p99) ms (range over the shards)"' run.json
  echo
  echo "| Kill | Recovered when | After |"
  echo "|---|---|---|"
  printf '%s\n' "${R[@]}"
else
  CPU=$(echo "scale=2; ($CPU1 - $CPU0) * 1000 / ($ACK + 1)" | bc); NCPU=$(echo "scale=2; ($NCPU1 - $NCPU0) * 1000 / ($ACK + 1)" | bc)
  echo "| Nodes | Devices | Sent / acked / observed (of shard 1's) | Steady PUBACK p50 / p99 ms (range over shards) | Observer end-to-end p50 / p99 ms | CPU s per 1,000 msgs (ours / nats-server) | RSS KiB per device, per node |"
  echo "|---|---|---|---|---|---|---|"
  jq -r --arg nodes "$NODES" --arg n "$N" --arg cpu "$CPU" --arg ncpu "$NCPU" --arg rss "${RSS_PER[*]}" \
    --arg p50 "$(range p50_ms)" --arg p99 "$(range p99_ms)" \
    '.telemetry as $t | "| \($nodes) | \($n) | \($t.sent // 0) / \($t.acked // 0) / \($t.observer.delivered // 0) | \($p50) / \($p99) | \($t.observer.latency.p50_ms // "-") / \($t.observer.latency.p99_ms // "-") | \($cpu) / \($ncpu) | \($rss) |"' run.json
fi
echo
echo "(run files in $D; report in run.json)"
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" > /dev/null 2>&1
