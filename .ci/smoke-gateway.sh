#!/usr/bin/env bash
# Runs the README's gateway (the demo) as a user would and checks what its printed curl commands answer.
set -euo pipefail
cd "$(dirname "$0")/.."
# Below the ephemeral range (32768 and up), where the tests' outgoing connections take ports.
port=$((20000 + RANDOM % 12000))
log=$(mktemp)
cargo run --quiet -p tower-fhir-gateway -- --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 900); do
  grep -q "demo token for the STU3" "$log" && grep -q "^try:" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "the gateway exited early"; exit 1; }
  sleep 0.2
done
dstu2=$(sed -n '/DSTU2 tenant (ES256/{n;p}' "$log" | tr -d ' ')
stu3=$(sed -n '/STU3 tenant (ES256/{n;p}' "$log" | tr -d ' ')
base="http://127.0.0.1:$port"
fail() { echo "FAIL $*"; cat "$log"; exit 1; }
expect() { # expected-status description curl-args...
  local want=$1 what=$2; shift 2
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  [ "$got" = "$want" ] || fail "$what: got $got, want $want"
  echo "ok $what ($got)"
}
expect 200 "metadata without a token" "$base/metadata"
curl -s "$base/metadata" | grep -q "\"valueUri\":\"$base/oauth/token\"" || fail "metadata does not name the token endpoint"
expect 200 "DSTU2 tenant reads its patient" -H "Authorization: Bearer $dstu2" "$base/Patient/1001"
expect 404 "STU3 tenant cannot see the DSTU2 hospital's patient" -H "Authorization: Bearer $stu3" "$base/Patient/1001"
expect 200 "STU3 tenant reads its patient" -H "Authorization: Bearer $stu3" "$base/Patient/2001"
expect 401 "no token" "$base/Patient/1001"
expect 200 "token endpoint, as printed" -u demo-app:demo-secret-change-me-0123456789 -d grant_type=client_credentials \
  -d scope=9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f "$base/oauth/token"
expect 200 "JWKS" "$base/.well-known/jwks.json"
expect 401 "admin without the admin token" -X PUT -d '{}' "$base/admin/tenants/9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f"
expect 400 "path traversal" -H "Authorization: Bearer $stu3" "$base/%2e%2e/Patient/1001"
bundle=$(curl -s -H "Authorization: Bearer $stu3" -d 'family=okafor' "$base/Patient/_search")
echo "$bundle" | grep -q "\"fullUrl\":\"$base/Patient/2002\"" || fail "Bundle fullUrl not rewritten: $bundle"
echo "ok form search, Bundle links point at the gateway"
# (`cargo run` execs the binary: $pid is the gateway's own process.)
report=$(cargo run --quiet -p fhir-loadgen -- --target "$base" --json --duration 1 --warmup 0 --connections 4 \
  --token-url "$base/oauth/token" --client-id demo-app --client-secret demo-secret-change-me-0123456789 \
  --tenants 9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f --path /Patient/2001 --cpu-of "gateway=$pid" 2>/dev/null) || true  # (a failed run is shown below)
echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["requests"] > 0 and r["errors"] == {} and list(r["statuses"]) == ["200"] and r["cpu_us_per_request"]["gateway"] > 0, r' \
  || fail "loadgen against the gateway: $report"
echo "ok loadgen drove the gateway and read its CPU time per request"
mix=$(mktemp)
printf '# weight method path [body]\n3 GET /Patient/2001\n1 post /Patient/_search family=okafor\n' >"$mix"
report=$(cargo run --quiet -p fhir-loadgen -- --target "$base" --json --requests 200 --warmup 0 --connections 4 \
  --token-url "$base/oauth/token" --client-id demo-app --client-secret demo-secret-change-me-0123456789 \
  --tenants 9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f --mix "$mix" 2>/dev/null) || true  # (a failed run is shown below)
rm -f "$mix"
echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["requests"] >= 200 and r["errors"] == {} and list(r["statuses"]) == ["200"], r' \
  || fail "loadgen with a --mix file: $report"
echo "ok loadgen drove the gateway with a mix of its own"
report=$(cargo run --quiet -p fhir-loadgen -- --target "$base" --json --duration 1 --warmup 0 --connections 2 \
  --http2 --token-url "$base/oauth/token" --client-id demo-app --client-secret demo-secret-change-me-0123456789 \
  --tenants 9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f --path /Patient/2001 2>/dev/null) || true  # (a failed run is shown below)
echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["requests"] > 0 and r["errors"] == {} and list(r["statuses"]) == ["200"], r' \
  || fail "loadgen over h2c: $report"
echo "ok loadgen drove the gateway over h2c"
# Open loop at 100 requests a second for 2 s: never more than the rate allows.
report=$(cargo run --quiet -p fhir-loadgen -- --target "$base" --json --duration 2 --warmup 0 --connections 4 \
  --rate 100 --token-url "$base/oauth/token" --client-id demo-app --client-secret demo-secret-change-me-0123456789 \
  --tenants 9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f --path /Patient/2001 2>/dev/null) || true  # (a failed run is shown below)
echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert 0 < r["requests"] <= 210 and r["errors"] == {} and list(r["statuses"]) == ["200"], r' \
  || fail "loadgen at a fixed rate: $report"
echo "ok loadgen held a fixed rate"
# Tokens minted by loadgen itself with the gateway's own signing key (ES256, its kid).
state=$(sed -n 's/^ *state in //p' "$log")
key=$(mktemp)
trap 'kill $pid 2>/dev/null || true; rm -f "$log" "$key"' EXIT
kid=$(python3 - "$state/signing-keys.json" "$key" <<'PY'
import json, sys
keys = json.load(open(sys.argv[1]))
open(sys.argv[2], "w").write(next(k["pem"] for k in keys["keys"] if k["kid"] == keys["current"]))
print(keys["current"])
PY
)
report=$(cargo run --quiet -p fhir-loadgen -- --target "$base" --json --requests 100 --warmup 0 --connections 2 \
  --mint-key "$key" --alg ES256 --kid "$kid" --issuer "$base" --audience tower-fhir \
  --tenants 9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f --path /Patient/2001 2>/dev/null) || true  # (a failed run is shown below)
rm -f "$key"
echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["requests"] >= 100 and r["errors"] == {} and list(r["statuses"]) == ["200"], r' \
  || fail "loadgen with tokens it minted (ES256): $report"
echo "ok loadgen minted ES256 tokens the gateway accepts"
kill -TERM $pid
wait $pid || fail "the gateway did not shut down cleanly on SIGTERM"
trap - EXIT
rm -f "$log"
echo "gateway smoke test passed"
