#!/usr/bin/env bash
# Runs the README's example as a user would and checks what its printed curl commands answer.
set -euo pipefail
cd "$(dirname "$0")/.."
# Below the ephemeral range (32768 and up), where the tests' outgoing connections take ports.
port=$((20000 + RANDOM % 12000))
log=$(mktemp)
cargo run --quiet --example bearer -- --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 900); do
  grep -q "listening on" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "example exited early"; exit 1; }
  sleep 0.2
done
token=$(grep -A1 "demo token" "$log" | tail -1 | tr -d ' ')
base="http://127.0.0.1:$port"
expect() { # expected-status description curl-args...
  local want=$1 what=$2; shift 2
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  if [ "$got" != "$want" ]; then echo "FAIL $what: got $got, want $want"; cat "$log"; exit 1; fi
  echo "ok $what ($got)"
}
expect 200 "metadata without a token" "$base/metadata"
expect 200 "Patient with the demo token" -H "Authorization: Bearer $token" "$base/Patient/example"
expect 401 "Patient without a token" "$base/Patient/example"
# A signature that fails to verify (not one that fails to decode): one character in the middle
# of the signature changed to another base64url character.
signature=${token##*.}
middle=$(( ${#signature} / 2 ))
was=${signature:$middle:1}
if [ "$was" = A ]; then now=B; else now=A; fi
tampered="${token%.*}.${signature:0:$middle}$now${signature:$((middle + 1))}"
[ "$tampered" != "$token" ] && [ ${#tampered} = ${#token} ] || { echo "FAIL could not tamper the token"; exit 1; }
expect 401 "Patient with a tampered signature" -H "Authorization: Bearer $tampered" "$base/Patient/example"
curl -s -D - -o /dev/null -H "Authorization: Bearer $tampered" "$base/Patient/example" | grep -qi 'error="invalid_token"' \
  || { echo "FAIL a tampered signature is not invalid_token"; cat "$log"; exit 1; }
echo "ok the tampered signature is invalid_token"
kill -TERM $pid
wait $pid || { echo "example did not shut down cleanly on SIGTERM"; exit 1; }
trap - EXIT
rm -f "$log"
echo "example smoke test passed"
