#!/usr/bin/env bash
# Runs the Eclipse Paho interoperability suite (github.com/eclipse/paho.mqtt.testing,
# interoperability/client_test.py for MQTT 3.1.1 and client_test5.py for MQTT 5) against a
# broker, each test on its own, and prints one line per test and the totals. The suite is not
# part of this repository: point the script at a checkout of its `interoperability` folder.
#
#   tests/paho-interop.sh PATH/TO/interoperability 127.0.0.1:18830 [3|5 [TEST...]]
#
# Start the platform with the conformance listener first, e.g.
#   target/debug/fleet-service serve --data-dir /tmp/conf --conformance-listen 127.0.0.1:18830 \
#     --mqtts-listen 127.0.0.1:0 --service-listen 127.0.0.1:0 --http-listen 127.0.0.1:0
set -euo pipefail
suite=${1:?path to paho.mqtt.testing/interoperability}
addr=${2:?host:port of the broker}
versions=${3:-3 5}
shift $(( $# < 3 ? $# : 3 ))
only="$*"
host=${addr%:*}
port=${addr##*:}

run() { # script test -> exit status of that one test
  local script=$1 test=$2
  # The scripts set their globals (topics, host, port) in their __main__ block, whose option
  # parsing cannot take a port for client_test.py; this sets them the same way instead.
  (cd "$suite" && timeout 120 python3 - "$script" "$test" "$host" "$port" <<'PY'
import importlib, sys, unittest
script, test, host, port = sys.argv[1:]
m = importlib.import_module(script)
m.host, m.port = host, int(port)
m.topic_prefix = "client_test5/"
prefix = m.topic_prefix if script == "client_test5" else ""
m.topics = [prefix + t for t in ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")]
m.wildtopics = [prefix + t for t in ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")]
m.nosubscribe_topics = ("test/nosubscribe",)
suite = unittest.defaultTestLoader.loadTestsFromName("Test." + test, m)
result = unittest.TextTestRunner(verbosity=0, stream=open("/dev/null", "w")).run(suite)
sys.exit(0 if result.wasSuccessful() else 1)
PY
  ) >/dev/null 2>&1
}

for v in $versions; do
  script=client_test; [ "$v" = 5 ] && script=client_test5
  tests=${only:-$(grep -oE '^    def (test[A-Za-z0-9_]+)' "$suite/$script.py" | awk '{print $2}')}
  pass=0; total=0
  for t in $tests; do
    total=$((total + 1))
    if run "$script" "$t"; then pass=$((pass + 1)); echo "PASS $script $t"; else echo "FAIL $script $t"; fi
  done
  echo "MQTT $v: $pass of $total passed"
done
