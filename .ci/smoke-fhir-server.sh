#!/usr/bin/env bash
# Runs examples/fhir_server.rs and drives it as its printed commands do: tokens from the token
# endpoint through the layer, each tenant's own store, each client's release.
set -euo pipefail
cd "$(dirname "$0")/.."
# Below the ephemeral range (32768 and up), where the tests' outgoing connections take ports.
port=$((20000 + RANDOM % 12000))
log=$(mktemp)
cargo run --quiet --example fhir_server -- --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 900); do
  grep -q '^client r4-app' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "example exited early"; exit 1; }
  sleep 0.2
done
base="http://127.0.0.1:$port"
contoso=4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f
fabrikam=9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f
secret_of() { grep "^client $1: secret " "$log" | sed 's/.*secret //'; }
token() {
  curl -s -u "$1:$(secret_of "$1")" -d grant_type=client_credentials -d "scope=$2" "$base/oauth/token" \
    | sed 's/.*"access_token":"\([^"]*\)".*/\1/'
}
a=$(token dstu2-app $contoso)
b=$(token r4-app $fabrikam)
expect() {
  local want=$1 what=$2; shift 2
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  [ "$got" = "$want" ] || { echo "FAIL $what: got $got, want $want"; cat "$log"; exit 1; }
  echo "ok $what ($got)"
}
expect 200 "the DSTU2 client reads Contoso's patient" -H "Authorization: Bearer $a" -H 'Accept: application/json+fhir' "$base/Patient/100"
expect 404 "Contoso's token cannot read Fabrikam's patient" -H "Authorization: Bearer $a" "$base/Patient/101"
expect 200 "the R4 client reads Fabrikam's patient" -H "Authorization: Bearer $b" -H 'Accept: application/fhir+json; fhirVersion=4.0' "$base/Patient/101"
expect 406 "Fabrikam serves no DSTU2" -H "Authorization: Bearer $b" -H 'Accept: application/fhir+json; fhirVersion=1.0' "$base/Patient/101"
expect 401 "no token" "$base/Patient/100"
# Captured first: `grep -q` closing the pipe early would fail curl under pipefail.
headers=$(curl -s -o /dev/null -D - -H "Authorization: Bearer $a" -H 'Accept: application/json+fhir' "$base/Patient/100")
grep -qi '^content-type: application/json+fhir' <<<"$headers" || { echo "FAIL DSTU2 media type: $headers"; exit 1; }
echo "ok the DSTU2 client gets the DSTU2 media type"
search=$(curl -s -H "Authorization: Bearer $b" "$base/Patient")
grep -q '"total":1' <<<"$search" || { echo "FAIL search: $search"; exit 1; }
echo "ok Fabrikam's search sees one patient"
kill -INT $pid
wait $pid || true
trap - EXIT
rm -f "$log"
echo "fhir_server smoke test passed"
