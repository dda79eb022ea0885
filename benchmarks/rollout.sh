#!/usr/bin/env bash
# A deployment to a cohort of N simulated devices (real device agents, `simulate update`),
# against a fresh `fleet-service serve` on 127.0.0.1 (ports 8883, 8884, 8080, artifacts on
# 8090). Prints the time from creating the deployment until it completed (or rolled back and
# its rollback completed), the fleet service's CPU seconds over that time, the deployment's
# summary and the simulator's table. Bounded: the simulator stops after 900 s.
#
#   cargo build --release -p fleet-service -p device-client
#   N=5000 benchmarks/rollout.sh
#   N=5000 BASELINE=1 FAIL="--fail-install 0.06 --fail-download 0.03 --fail-verify 0.02 --silent 0.01 --min-deployments 3" \
#     POLICY='{"waves": [{"percent": 10}, {"percent": 50}], "failure_threshold_percent": 10, "min_devices": 50, "on_failure": "rollback", "timeout_s": 20}' \
#     benchmarks/rollout.sh
#
# BASELINE=1 first deploys release 1.0.0 (what the devices run), so a rollback has a target.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
POLICY=${POLICY:-'{"waves": [{"percent": 10}, {"percent": 50}]}'}
N=${N:-5000}; D=${D:-/tmp/rollout-bench}; rm -rf "$D/run"; mkdir -p "$D/run"; cd "$D/run"
. "$HERE/platform.sh"
trap 'kill $PID ${HTTP:-} ${SIM:-} 2>/dev/null' EXIT
$DC release keygen --out-key release.key --out-pub release.pub > /dev/null
jq -n --rawfile k release.pub '{name: "bench", public_key: ($k | rtrimstr("\n"))}' \
  | curl -s -H "$H" -H "$J" --data @- $API/signing-keys > /dev/null
# A 64 KiB artifact. Python's server with a deep listen backlog: its default (5) refuses most
# of a 2,000-device wave at once, which would measure the artifact server, not the platform.
mkdir -p artifacts && head -c 65536 /dev/urandom > artifacts/fw.bin
(cd artifacts && exec python3 -c 'import http.server as h, functools
h.ThreadingHTTPServer.request_queue_size = 4096
h.ThreadingHTTPServer(("127.0.0.1", 8090), functools.partial(h.SimpleHTTPRequestHandler, directory=".")).serve_forever()') > /dev/null 2>&1 &
HTTP=$!
release() {
  $DC release sign --key release.key --product-id $PRODUCT --version $1 \
    --url http://127.0.0.1:8090/fw.bin --artifact artifacts/fw.bin \
    | curl -s -H "$H" -H "$J" --data @- $API/releases | jq -r .id
}
V1=$(release 1.0.0); V2=$(release 2.0.0)
$DC simulate update --url mqtts://127.0.0.1:$MQTTS_PORT --server-ca data/pki/server-ca.pem \
  --ca-cert mfg-ca.pem --ca-key mfg-ca.key --cert-cache "$D/certs" --devices $N --concurrency 50 \
  --cohort $COHORT --update-key release.pub --settle 3s --max-duration 900 ${FAIL:-} > sim.out 2> sim.err &
SIM=$!
until grep -q "$N of $N devices started" sim.err 2> /dev/null; do kill -0 $SIM 2> /dev/null || exit 1; sleep 1; done
echo "$N devices up; server RSS $(awk '/^VmRSS/{print $2}' /proc/$PID/status) KiB"
deploy() {
  jq -n --arg r "$1" --arg c "$COHORT" --argjson p "$2" '{release_id: $r, cohort_id: $c, policy: $p}' \
    | curl -s -H "$H" -H "$J" --data @- $API/deployments | jq -r .id
}
state() { curl -s -H "$H" $API/deployments/$1 | jq -r .state; }
sleep 5
if [ -n "${BASELINE:-}" ]; then
  BASE=$(deploy $V1 '{"timeout_s": 20}')
  until [ "$(state $BASE)" = completed ]; do sleep 0.5; done
  echo "baseline 1.0.0 completed"
fi
C0=$(cpu_s $PID); T0=$(date +%s.%N)
DEP=$(deploy $V2 "$POLICY")
while true; do
  S=$(state $DEP)
  [ "$S" = completed ] && break
  if [ "$S" = rolled_back ]; then
    echo "rolled back after $(echo "$(date +%s.%N) - $T0" | bc) s"
    RB=$(curl -s -H "$H" $API/deployments/$DEP | jq -r .rolled_back_by)
    until [ "$(state $RB)" = completed ]; do sleep 0.5; done
    break
  fi
  kill -0 $SIM 2> /dev/null || break
  sleep 0.5
done
T1=$(date +%s.%N); C1=$(cpu_s $PID)
echo "done in $(echo "$T1 - $T0" | bc) s; fleet-service CPU $(echo "$C1 - $C0" | bc) s"
curl -s -H "$H" $API/deployments/$DEP | jq -c '{state, state_reason, admitted: .summary.admitted, by_status: .summary.by_status}'
[ -n "${RB:-}" ] && curl -s -H "$H" $API/deployments/$RB | jq -c '{kind, state, state_reason}'
wait $SIM; cat sim.out
