# Sourced by the benchmark scripts: starts a fresh `fleet-service serve` (release) in the
# current directory on 127.0.0.1 (devices on MQTTS_PORT, services on SERVICE_PORT, REST on
# HTTP_PORT: 8883, 8884, 8080 unless set; DB names a database URL, SQLite under ./data
# otherwise; SERVE_ENV adds environment variables, e.g. MALLOC_ARENA_MAX=2), waits until it
# answers, and sets up what every run needs: a product and a cohort, and a manufacturing CA
# (mfg-ca.pem/.key) registered with proof of possession to provision into them. Sets ROOT, B, DC, PID, H, J, API, PRODUCT,
# COHORT, and cpu_s PID (the server's CPU seconds so far).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); B=$ROOT/target/release; DC=$B/device-client
ulimit -n 20000 2>/dev/null || true
MQTTS_PORT=${MQTTS_PORT:-8883}; SERVICE_PORT=${SERVICE_PORT:-8884}; HTTP_PORT=${HTTP_PORT:-8080}
cpu_s() { awk '{printf "%.2f\n", ($14 + $15) / 100}' /proc/$1/stat; }
DBARG=(); [ -n "${DB:-}" ] && DBARG=(--database-url "$DB")
env ${SERVE_ENV:-} $B/fleet-service serve --data-dir data "${DBARG[@]}" --mqtts-listen 127.0.0.1:$MQTTS_PORT \
  --service-listen 127.0.0.1:$SERVICE_PORT --http-listen 127.0.0.1:$HTTP_PORT > serve.log 2>&1 &
PID=$!
until curl -sf http://127.0.0.1:$HTTP_PORT/api/v1/health > /dev/null; do
  kill -0 $PID 2> /dev/null || { echo "fleet-service did not start:"; cat serve.log; exit 1; }
  sleep 0.2
done
API=http://127.0.0.1:$HTTP_PORT/api/v1
. "$ROOT/benchmarks/jitp-ca.sh"
