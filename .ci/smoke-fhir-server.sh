#!/usr/bin/env bash
# Runs examples/fhir_server.rs and checks each tenant sees its own store only.
set -euo pipefail
cd "$(dirname "$0")/.."
port=$((20000 + RANDOM % 20000))
log=$(mktemp)
cargo run --quiet --example fhir_server -- --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 900); do
  [ "$(grep -c '^  ey' "$log")" = 2 ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "example exited early"; exit 1; }
  sleep 0.2
done
a=$(grep '^  ey' "$log" | sed -n 1p | tr -d ' ')
b=$(grep '^  ey' "$log" | sed -n 2p | tr -d ' ')
base="http://127.0.0.1:$port"
expect() {
  local want=$1 what=$2; shift 2
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  [ "$got" = "$want" ] || { echo "FAIL $what: got $got, want $want"; cat "$log"; exit 1; }
  echo "ok $what ($got)"
}
expect 200 "tenant A reads its patient" -H "Authorization: Bearer $a" "$base/Patient/100"
expect 404 "tenant A cannot read tenant B's patient" -H "Authorization: Bearer $a" "$base/Patient/101"
expect 200 "tenant B reads its patient" -H "Authorization: Bearer $b" "$base/Patient/101"
expect 401 "no token" "$base/Patient/100"
curl -s -H "Authorization: Bearer $b" "$base/Patient" | grep -q '"total":1' || { echo "FAIL search"; exit 1; }
echo "ok tenant B's search sees one patient"
kill -INT $pid
wait $pid || true
trap - EXIT
rm -f "$log"
echo "fhir_server smoke test passed"
