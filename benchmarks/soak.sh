#!/usr/bin/env bash
# A soak with churn against a fresh `fleet-service serve` (release; ports 48883/48884/48080
# unless MQTTS_PORT/SERVICE_PORT/HTTP_PORT say otherwise): N devices (1,000) are provisioned
# by a connect storm (JITP), then `simulate soak` runs for MINUTES minutes: every device
# publishes QoS 1 telemetry at RATE msg/s (1), CHURN of the devices (20%) are dropped per
# minute at random (half abruptly, half cleanly) and reconnect 0.5-2.5 s later, and a backend
# observer on devices/+/telemetry counts what the broker delivers.
#
# While it runs: one line per minute since the soak started (server RSS, server CPU s in that
# minute). At the end: one row per minute of the simulator's publishing (its interval rows,
# with the server's RSS at the end of the minute and CPU in it), then the simulator's summary;
# lost must be 0. Exits 1 when anything acknowledged was lost or the soak did not finish.
# Bounded: the simulator stops after MINUTES + 5 minutes at most; the server is stopped on exit.
#
#   cargo build --release -p fleet-service -p device-client
#   MINUTES=30 benchmarks/soak.sh
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
MINUTES=${MINUTES:-30}; N=${N:-1000}; RATE=${RATE:-1}; CHURN=${CHURN:-20%}
MQTTS_PORT=${MQTTS_PORT:-48883}; SERVICE_PORT=${SERVICE_PORT:-48884}; HTTP_PORT=${HTTP_PORT:-48080}
D=${D:-/tmp/soak-bench}; rm -rf "$D"; mkdir -p "$D"; cd "$D" || exit 1
ulimit -n 20000 || { echo "cannot raise the open-file limit to 20000"; exit 1; }
for p in $MQTTS_PORT $SERVICE_PORT $HTTP_PORT; do
  [ -z "$(ss -Hltn "sport = :$p")" ] || { echo "port $p is in use"; exit 1; }
done
PID=; SAMPLER=; SIM=
cleanup() {
  for p in $SIM $SAMPLER; do kill "$p" 2> /dev/null; done
  if [ -n "$PID" ]; then kill -INT "$PID" 2> /dev/null; sleep 1; kill "$PID" 2> /dev/null; fi
  wait 2> /dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Sets ROOT, DC, PID, mfg-ca.pem/.key registered with JITP, data/admin-token.
. "$HERE/platform.sh"
CLK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' /proc/$PID/stat; }
rss_kib() { awk '/^VmRSS/{print $2}' /proc/$PID/status; }
# Server samples every second: unix time, CPU ticks, RSS KiB.
sample() { while [ -e /proc/$PID ]; do printf '%s %s %s\n' "$(date +%s.%N)" "$(ticks)" "$(rss_kib)"; sleep 1; done; }
sample > server.samples & SAMPLER=$!

TLS=(--url mqtts://127.0.0.1:$MQTTS_PORT --server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
$DC simulate connect-storm "${TLS[@]}" --devices $N --concurrency 50 --hold --max-duration 300s \
  > provision.out 2>&1 || { echo "provisioning failed:"; tail -20 provision.out; exit 1; }
export DEVICE_CLIENT_OBSERVE_PASSWORD; DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token)
SOAK=("$DC" simulate soak "${TLS[@]}" --devices $N --concurrency 50 --rate $RATE --qos 1
  --duration ${MINUTES}m --report-every 60s --churn-per-min $CHURN --max-duration $((MINUTES * 60 + 300))s
  --observe-url mqtt://127.0.0.1:$SERVICE_PORT --observe-username svc --json)
echo "== soak: $N devices, $RATE msg/s QoS 1, $CHURN dropped per minute, $MINUTES min; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "minute  server RSS MiB  server CPU s (since the soak started)"
"${SOAK[@]}" > soak.json 2> soak.err &
SIM=$!
T0=$(date +%s); C0=$(ticks); M=0
while kill -0 $SIM 2> /dev/null; do
  sleep 1
  if [ $(( $(date +%s) - T0 )) -ge $(( (M + 1) * 60 )) ]; then
    M=$((M + 1)); C=$(ticks)
    printf '%6d  %13.1f  %12.2f\n' $M "$(echo "$(rss_kib) / 1024" | bc -l)" "$(echo "($C - $C0) / $CLK" | bc -l)"
    C0=$C
  fi
done
wait $SIM; RC=$?; SIM=
kill $SAMPLER 2> /dev/null; wait $SAMPLER 2> /dev/null; SAMPLER=
jq -e .telemetry soak.json > /dev/null 2>&1 || { echo "the soak did not report (exit $RC):"; tail -20 soak.err; exit 1; }

echo
echo "== per minute of publishing (simulator's rows; server RSS at the end of the minute, CPU in it)"
echo "| Minute | Server RSS MiB | Server CPU s | Sent | Acked | Delivered | Dropped | Reconnected | Lost sessions | PUBACK p50 / p99 ms | Client RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
W0=$(jq -r '.telemetry.window_unix_s[0]' soak.json)
jq -r '.telemetry.intervals[] | [.end_s, .sent, .acked, .delivered, .drops, .reconnects, .sessions_lost,
    (.puback_latency.p50_ms // -1), (.puback_latency.p99_ms // -1), (.rss_bytes / 1048576)] | @tsv' soak.json |
  awk -v w0="$W0" -v clk="$CLK" 'BEGIN { prev = 0; m = 0 }
    NR == FNR { t[NR] = $1; c[NR] = $2; r[NR] = $3; n = NR; next }
    {
      m++; end = w0 + $1
      # CPU ticks at the last sample at or before each edge; RSS at the end.
      c0 = ""; c1 = ""; rss = ""
      for (i = 1; i <= n; i++) { if (t[i] <= w0 + prev) c0 = c[i]; if (t[i] <= end) { c1 = c[i]; rss = r[i] } }
      cpu = (c0 == "" || c1 == "") ? "-" : sprintf("%.2f", (c1 - c0) / clk)
      # After the last full interval the simulator adds what came until the stop to that row,
      # or gives it a row of its own when it spans half an interval or more.
      label = ($1 - prev < 59) ? sprintf("last %.1f s", $1 - prev) : m
      printf "| %s | %.1f | %s | %d | %d | %d | %d | %d | %d | %.1f / %.1f | %.1f |\n", label, rss / 1024, cpu, $2, $3, $4, $5, $6, $7, $8, $9, $10
      prev = $1
    }' server.samples -
echo
jq -r '.telemetry as $t | .churn as $c | $t.observer as $o |
  "summary: sent \($t.sent), acked \($t.acked), delivered \($o.delivered), LOST \($o.lost), duplicates \($o.duplicates), delivered unconfirmed (in flight at a drop) \($o.delivered_unconfirmed)",
  "  foreign \($o.foreign) (messages on the filter that are not this run'"'"'s telemetry: other clients on the same topics; neither delivered nor lost)",
  "  drops \($c.drops) (abrupt \($c.drops_abrupt), clean \($c.drops_clean)), reconnects \($c.reconnects) ok / \($c.reconnect_failures) failed, offline at end \($c.offline_at_end), lost sessions \($c.lost_sessions)",
  "  PUBACK ms p50 \($t.puback_latency.p50_ms) p99 \($t.puback_latency.p99_ms) max \($t.puback_latency.max_ms); reconnect CONNACK ms p50 \($c.reconnect_latency.p50_ms) p99 \($c.reconnect_latency.p99_ms)",
  "  client: RSS \(.process.rss_peak_bytes / 1048576 | floor) MiB peak, \(.process.cpu_per_message_us // 0 | floor) µs CPU per message; truncated \(.truncated)"' soak.json
echo "server: RSS max $(awk '$3 > m {m = $3} END {printf "%.1f", m / 1024}' server.samples) MiB; serve.log warnings $(grep -c WARN serve.log), errors $(grep -c ERROR serve.log); files in $D"
echo "command:"; printf '  DEVICE_CLIENT_OBSERVE_PASSWORD=$(cat data/admin-token) '; printf '%q ' "${SOAK[@]}"; echo
LOST=$(jq -r '.telemetry.observer.lost' soak.json)
[ "$LOST" = 0 ] && [ "$(jq -r .truncated soak.json)" = false ] || { echo "FAILED: lost $LOST"; exit 1; }
