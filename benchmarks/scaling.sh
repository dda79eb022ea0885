#!/usr/bin/env bash
# One row of the scaling table (issue 12) against a fresh broker: our platform (default) or
# Mosquitto 2 configured as a user would (BROKER=mosquitto). N mTLS devices (ids sim-...):
#   1. connect storm, CONCURRENCY handshakes at a time, every device held until all are in
#      (on our platform the first connection provisions each device: JITP);
#   2. the scale run (`simulate telemetry`): each device connects, subscribes in one SUBSCRIBE
#      to devices/{id}/commands, cohorts/$COHORT/updates and cohorts/$COHORT/commands, and once
#      granted publishes QoS 1 telemetry at RATE msg/s for DURATION s, with a backend observer
#      on devices/+/telemetry; then, from the observer's session, one command on
#      cohorts/$COHORT/commands (time until every device had it) and one command each to
#      PROBES random devices, one at a time (time until that device had it).
# The server's RSS and CPU (utime+stime, /proc/PID/stat) are sampled every 0.25 s throughout:
# RSS per device is (max RSS during the scale run - RSS before the storm) / N; CPU per 1,000
# messages is the CPU over the telemetry window (first publish until every PUBACK was in, from
# the report) per 1,000 acknowledged telemetry publishes (each also delivered to the observer).
# Prints the markdown row, the header, and the exact commands. Bounded: every simulator run
# stops by itself (--max-duration); the broker and the samplers are stopped on exit.
#
#   cargo build --release -p fleet-service -p device-client
#   N=1000 benchmarks/scaling.sh
#   BROKER=mosquitto N=1000 benchmarks/scaling.sh
#   N=18000 SHARDS=2 benchmarks/scaling.sh      # the scale run as 2 simulator processes
#
# Settings (environment): N (1000), RATE (0.5), DURATION (60, seconds), CONCURRENCY (50),
# PROBES (50), SHARDS (1), LOAD_MAX (1.5: wait up to 10 min for the 1-minute load average to
# drop below it; 0 to skip), D (/tmp/scaling/<broker>-<N>: the run's files, removed first).
# Ports: ours MQTTS_PORT/SERVICE_PORT/HTTP_PORT (38883/38884/38080); Mosquitto MOSQ_TLS_PORT
# and MOSQ_PLAIN_PORT (18883/18884). The system Mosquitto (1883) is never touched.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BROKER=${BROKER:-platform}; N=${N:-1000}; RATE=${RATE:-0.5}; DURATION=${DURATION:-60}
CONCURRENCY=${CONCURRENCY:-50}; PROBES=${PROBES:-50}; SHARDS=${SHARDS:-1}; LOAD_MAX=${LOAD_MAX:-1.5}
case $BROKER in platform|mosquitto) ;; *) echo "BROKER must be platform or mosquitto"; exit 2;; esac
D=${D:-/tmp/scaling/$BROKER-$N}; rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
ulimit -n 20000 || { echo "cannot raise the open-file limit to 20000"; exit 1; }
ROOT=$(cd "$HERE/.." && pwd); DC=$ROOT/target/release/device-client
[ -x "$DC" ] || { echo "build first: cargo build --release -p fleet-service -p device-client"; exit 1; }
PID=; SAMPLER=; SIMS=()
cleanup() {
  for p in ${SIMS[@]+"${SIMS[@]}"} $SAMPLER; do kill "$p" 2> /dev/null; done
  if [ -n "$PID" ]; then kill -INT "$PID" 2> /dev/null; sleep 1; kill "$PID" 2> /dev/null; fi
  wait 2> /dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
port_free() { [ -z "$(ss -Hltn "sport = :$1")" ]; }
load_ok() { awk -v m="$LOAD_MAX" '{exit !($1 < m)}' /proc/loadavg; }
if [ "$LOAD_MAX" != 0 ]; then
  for _ in $(seq 1 20); do load_ok && break; echo "load $(cut -d' ' -f1 /proc/loadavg), waiting" >&2; sleep 30; done
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

if [ "$BROKER" = platform ]; then
  MQTTS_PORT=${MQTTS_PORT:-38883}; SERVICE_PORT=${SERVICE_PORT:-38884}; HTTP_PORT=${HTTP_PORT:-38080}
  for p in $MQTTS_PORT $SERVICE_PORT $HTTP_PORT; do port_free $p || { echo "port $p is in use"; exit 1; }; done
  # Sets PID, COHORT, mfg-ca.pem/.key (registered with JITP into COHORT), data/admin-token.
  . "$HERE/platform.sh"
  DEV_PORT=$MQTTS_PORT; SERVER_CA=data/pki/server-ca.pem
  OBS=(--observe-url mqtt://127.0.0.1:$SERVICE_PORT --observe-username svc)
  export DEVICE_CLIENT_OBSERVE_PASSWORD; DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token)
  # The last commit that changed the server, and whether the tree differs from it.
  VERSION="fleet-service $(git -C "$ROOT" log -1 --format=%h -- broker fleet-service wire Cargo.lock)$(git -C "$ROOT" diff --quiet HEAD -- broker fleet-service wire Cargo.lock || echo +changes)"
else
  DEV_PORT=${MOSQ_TLS_PORT:-18883}; PLAIN_PORT=${MOSQ_PLAIN_PORT:-18884}
  for p in $DEV_PORT $PLAIN_PORT; do port_free $p || { echo "port $p is in use"; exit 1; }; done
  command -v mosquitto > /dev/null || { echo "mosquitto is not installed (apt-get install mosquitto)"; exit 1; }
  # Any cohort id: Mosquitto knows no cohorts, the ACL grants the topic to every device.
  COHORT=$(cat /proc/sys/kernel/random/uuid)
  $DC pki ca --out-cert mfg-ca.pem --out-key mfg-ca.key --cn "Bench Manufacturing CA" 2> /dev/null
  $DC pki ca --out-cert server-ca.pem --out-key server-ca.key --cn "Bench Mosquitto Server CA" 2> /dev/null
  $DC pki server --ca-cert server-ca.pem --ca-key server-ca.key --name 127.0.0.1 --name localhost \
    --out-cert server.pem --out-key server.key 2> /dev/null
  # Started as root, Mosquitto drops to the user mosquitto, which must read the key and ACL and
  # write the log.
  mkdir -p mosq
  install -o mosquitto -m 600 server.key mosq/server.key
  cat > mosq/acl <<EOF
# Devices: the certificate's CN is the user name (%u).
pattern read devices/%u/commands
pattern write devices/%u/#
pattern read cohorts/$COHORT/#
EOF
  cat > mosq/mosquitto.conf <<EOF
per_listener_settings true
persistence false
log_dest file $D/mosq/mosquitto.log
set_tcp_nodelay true

# Devices: mutual TLS; the certificate's CN is the user name; no anonymous clients.
listener $DEV_PORT 127.0.0.1
cafile $D/mfg-ca.pem
certfile $D/server.pem
keyfile $D/mosq/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
acl_file $D/mosq/acl

# Observer and publisher (the role of our service listener): plain MQTT.
listener $PLAIN_PORT 127.0.0.1
allow_anonymous true
EOF
  chown -R mosquitto mosq; chmod 755 "$D"
  mosquitto -c mosq/mosquitto.conf > mosq/stdout.log 2>&1 &
  PID=$!
  for _ in $(seq 1 100); do
    port_free $DEV_PORT || port_free $PLAIN_PORT || break
    kill -0 $PID 2> /dev/null || { echo "mosquitto did not start:"; cat mosq/stdout.log mosq/mosquitto.log; exit 1; }
    sleep 0.1
  done
  port_free $PLAIN_PORT && { echo "mosquitto does not listen"; exit 1; }
  SERVER_CA=server-ca.pem
  OBS=(--observe-url mqtt://127.0.0.1:$PLAIN_PORT)
  VERSION=$(mosquitto -h 2>&1 | head -1)
fi

# Server samples: unix time, CPU ticks (utime+stime), RSS KiB.
CLK=$(getconf CLK_TCK)
sample_once() { printf '%s %s %s\n' "$(date +%s.%N)" "$(awk '{print $14 + $15}' /proc/$PID/stat)" \
  "$(awk '/^VmRSS/{print $2}' /proc/$PID/status)"; }
(while [ -e /proc/$PID ]; do sample_once; sleep 0.25; done) > server.samples 2> /dev/null & SAMPLER=$!
sleep 0.5
RSS_START=$(awk '/^VmRSS/{print $2}' /proc/$PID/status)

TLS=(--url mqtts://127.0.0.1:$DEV_PORT --server-ca $SERVER_CA --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
# Mint the certificates first (nothing listens on port 1), so the storm measures connecting.
$DC simulate connect-storm --url mqtts://127.0.0.1:1 --server-ca $SERVER_CA --ca-cert mfg-ca.pem \
  --ca-key mfg-ca.key --cert-cache certs --devices $N --concurrency 1 --connect-timeout 1s \
  --max-duration 600s > /dev/null 2>&1
STORM=("$DC" simulate connect-storm "${TLS[@]}" --devices $N --concurrency $CONCURRENCY --hold --max-duration 900s --json)
"${STORM[@]}" > storm.json 2> storm.err
sleep 5
T0=$(date +%s.%N)
SCALE=("$DC" simulate telemetry "${TLS[@]}" --devices $N --concurrency $CONCURRENCY --qos 1 --rate $RATE
  --duration ${DURATION}s --subscribe-commands --subscribe "cohorts/$COHORT/updates"
  --subscribe "cohorts/$COHORT/commands" "${OBS[@]}" --probe-fanout "cohorts/$COHORT/commands"
  --probe-commands $PROBES --max-duration $((DURATION + 900))s --json)
if [ "$SHARDS" -le 1 ]; then
  "${SCALE[@]}" > scale.json 2> scale.err
else
  for K in $(seq 1 "$SHARDS"); do
    "${SCALE[@]}" --shard "$K/$SHARDS" > "scale-$K.json" 2> "scale-$K.err" & SIMS+=($!)
  done
  wait "${SIMS[@]}"; SIMS=()
  "$DC" simulate merge --json scale-*.json > scale.json 2> scale.err
fi
T1=$(date +%s.%N)
kill $SAMPLER 2> /dev/null; wait $SAMPLER 2> /dev/null; SAMPLER=
sample_once >> server.samples
for f in storm scale; do
  jq -e . $f.json > /dev/null 2>&1 || { echo "no $f report:"; tail -5 $f.err; echo '{}' > $f.json; }
done

# Server figures from the samples: max RSS during the scale run; CPU over the telemetry window.
read -r W0 W1 < <(jq -r '.telemetry.window_unix_s // [0, 0] | "\(.[0]) \(.[1])"' scale.json)
RSS_MAX=$(awk -v a=$T0 -v b=$T1 '$1 >= a && $1 <= b && $3 > m {m = $3} END {print m + 0}' server.samples)
# CPU ticks at W0 and at W1, interpolated between the samples around each.
CPU_TICKS=$(awk -v a="$W0" -v b="$W1" '{ t[NR] = $1; c[NR] = $2 }
  function at(x,  i) {
    for (i = 2; i <= NR; i++) if (t[i] >= x) return c[i-1] + (c[i] - c[i-1]) * (x - t[i-1]) / (t[i] - t[i-1])
    return ""
  }
  END { c0 = (a > t[1]) ? at(a) : ""; c1 = at(b); print ((c0 == "" || c1 == "") ? "" : c1 - c0) }' server.samples)

# n: a latency or figure (2 significant decimals below 10); c: a count with thousands commas.
fmt='def c: tostring | if length <= 3 then . else (.[:-3] | c) + "," + .[-3:] end;
  def n: if . == null then "-" elif . >= 100 then (round | c)
    elif . >= 10 then ((. * 10 | round) / 10 | tostring) else ((. * 100 | round) / 100 | tostring) end;'
jq -r --arg broker "$([ "$BROKER" = platform ] && echo ours || echo Mosquitto)" --argjson n "$N" \
  --arg rss_start "$RSS_START" --arg rss_max "$RSS_MAX" --arg ticks "$CPU_TICKS" --arg clk "$CLK" \
  --slurpfile storm storm.json "$fmt"'
  ($storm[0]) as $s | .telemetry as $t | $t.probes as $p | ($s.rounds // [{}])[0] as $r
  | (.rounds // [{}])[0] as $c
  | (($rss_max | tonumber) - ($rss_start | tonumber)) as $rss
  | (if $ticks == "" or ($t.acked // 0) == 0 then null
     else ($ticks | tonumber) / ($clk | tonumber) / ($t.acked / 1000) end) as $cpu
  | [ $broker, ($n | c),
      "\($r.connects_per_s | n) (\($r.connack_latency.p50_ms | n) / \($r.connack_latency.p99_ms | n))",
      "\($t.commands_subscription.suback_latency.p50_ms | n) / \($t.commands_subscription.suback_latency.p99_ms | n)",
      "\($t.first_puback_latency.p50_ms | n) / \($t.first_puback_latency.p99_ms | n)",
      "\($t.later_puback_latency.p50_ms | n) / \($t.later_puback_latency.p99_ms | n)",
      "\($t.observer.delivered // 0 | c) / \($t.acked // 0 | c) / \($t.sent // 0 | c)\(if $t.observer.delivered != null and $t.observer.delivered == $t.acked and $t.acked == $t.sent then "" else " **≠**" end)",
      "\(($r.dropped // 0) + ($c.dropped // 0)) / \(($r.failed // 0) + ($r.unanswered // 0) + ($c.failed // 0) + ($c.unanswered // 0) + ($t.commands_subscription.refused // 0) + ($t.commands_subscription.unanswered // 0))",
      "\($rss / $n | n) (\($rss_max | tonumber / 1024 | n) MiB)",
      "\($cpu | n)",
      (if $p.fanout == null then "-" elif $p.fanout.all_received_ms != null then ($p.fanout.all_received_ms | n)
       else "**\($p.fanout.received | c) of \($p.fanout.expected | c)** in \($p.fanout.last_received_ms | n)" end),
      "\($p.commands.latency.p50_ms | n) / \($p.commands.latency.p99_ms | n)\(if ($p.commands.delivered // 0) == ($p.commands.sampled // -1) then "" else " (**\($p.commands.delivered // 0) of \($p.commands.sampled // 0)**)" end)"
    ] | "| " + join(" | ") + " |"' scale.json > row.md

echo "== $VERSION; $N devices, $RATE msg/s each for ${DURATION} s; load at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| Broker | Devices | Storm conn/s (CONNACK p50 / p99 ms) | SUBACK p50 / p99 ms | First PUBACK p50 / p99 ms | Steady PUBACK p50 / p99 ms | Delivered / acked / sent | Dropped / not connected | Server RSS KiB/device (max) | Server CPU s per 1,000 msgs | Cohort fan-out: all received ms | Command to one device p50 / p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
cat row.md
jq -r '.telemetry as $t | "scale run: connect \(.rounds[0].connects_per_s | floor)/s, \($t.devices_publishing) publishing, \($t.acked_per_s // 0 | floor) acked/s; observer lost \($t.observer.lost // "-"), duplicates \($t.observer.duplicates // "-"); probes: fan-out \($t.probes.fanout.received // "-")/\($t.probes.fanout.expected // "-"), commands \($t.probes.commands.delivered // "-")/\($t.probes.commands.sampled // "-")\(if $t.probes.error then ", error: " + $t.probes.error else "" end); truncated \(.truncated)"' scale.json 2> /dev/null
echo "server: RSS $((RSS_START / 1024)) MiB before the storm, $((RSS_MAX / 1024)) MiB max during the scale run; CPU ${CPU_TICKS:-?} ticks (CLK_TCK $CLK) over the telemetry window; files in $D"
echo "commands:"
printf '  '; printf '%q ' "${STORM[@]}"; echo
printf '  '; [ "$BROKER" = platform ] && printf 'DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token) '
printf '%q ' "${SCALE[@]}"; [ "$SHARDS" -gt 1 ] && printf -- '--shard K/%s (K = 1..%s), then simulate merge' "$SHARDS" "$SHARDS"; echo
