#!/usr/bin/env bash
# A first-connection storm (JITP) while devices that are already connected keep publishing,
# against a fresh `fleet-service serve` on 127.0.0.1 (ports 8883, 8884, 8080). Prints the
# storm's table (connects/s, CONNACK percentiles), the connected devices' telemetry table with
# one row per second (their PUBACK latency during the storm), the kernel's listen overflows,
# the database pool's slow-acquire warnings and the server's CPU. Bounded: every simulator run
# stops by itself.
#
#   cargo build --release -p fleet-service -p device-client
#   N=2000 CONCURRENCY=2000 benchmarks/connect-storm.sh
#   DB=postgres://postgres@127.0.0.1:5432/storm N=2000 benchmarks/connect-storm.sh
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
N=${N:-2000}; CONCURRENCY=${CONCURRENCY:-$N}; LIVE=${LIVE:-100}
D=${D:-/tmp/storm-bench}; rm -rf "$D/run"; mkdir -p "$D/run"; cd "$D/run"
overflows() { nstat -az TcpExtListenOverflows 2>/dev/null | awk '/ListenOverflows/{print $2}'; }
. "$HERE/platform.sh"
trap 'kill $PID ${LIVE_PID:-} 2>/dev/null' EXIT
TLS=(--server-ca data/pki/server-ca.pem --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache certs)
URL=(--url mqtts://127.0.0.1:$MQTTS_PORT)
# Mint the storm's certificates first, so the storm measures connecting, not minting.
$DC simulate connect-storm "${TLS[@]}" --id-prefix storm- --devices $N --concurrency 1 \
  --url mqtts://127.0.0.1:1 --connect-timeout 1s --max-duration 120s > /dev/null 2>&1
# The connected devices: provisioned, then publishing QoS 1 at 1 msg/s for the whole run.
$DC simulate telemetry "${URL[@]}" "${TLS[@]}" --id-prefix live- --devices $LIVE --concurrency 50 \
  --rate 1 --qos 1 --duration 40s --report-every 1s > live.out 2> live.err &
LIVE_PID=$!
sleep 12
O0=$(overflows); C0=$(cpu_s $PID)
$DC simulate connect-storm "${URL[@]}" "${TLS[@]}" --id-prefix storm- --devices $N --concurrency $CONCURRENCY \
  --hold --repeat 1 --max-duration 120s > storm.out 2> storm.err
C1=$(cpu_s $PID); O1=$(overflows)
wait $LIVE_PID
echo "== storm: $N first connections, $CONCURRENCY at a time"; cat storm.out
echo "== $LIVE connected devices publishing during the storm (one row per second)"; cat live.out
echo "== server: CPU $(echo "$C1 - $C0" | bc) s during the storm; listen overflows $((${O1:-0} - ${O0:-0}));" \
  "slow pool acquires $(grep -c 'exceeded slow threshold' serve.log)"
