#!/usr/bin/env bash
# Requests/s of the gateway with `workers: 1` against `workers: N` (N = the CPUs, at least 2),
# each with wrk (`-t2 -c64`, `GET /Patient/123` with a token) and the fixed upstream, nothing
# pinned: on a machine with few CPUs the load side shares them with the gateway, so the ratio
# is a floor of what N workers give where the load comes from elsewhere. ROUNDS rounds, the
# order of the two alternating; the ratio is taken within each round and its median printed.
#
#   bash benches/scale.sh
#   ROUNDS=6 DURATION=10 bash benches/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}; ROUNDS=${ROUNDS:-4}; CONNECTIONS=${CONNECTIONS:-64}
# shellcheck source=benches/harness.sh
. benches/harness.sh
need wrk wrk
cpus=$(nproc)
many=$(( cpus < 2 ? 2 : cpus ))
tenant=00000000-0000-4000-8000-000000000000
up=$(port)
"$bin/bench_servers" upstream --listen "127.0.0.1:$up" >/dev/null & pids+=($!)
wait_port "$up"

# one WORKERS ROUND: starts a gateway with that many workers, loads it, stops it.
one() {
  local workers=$1 round=$2 gw
  gw=$(port)
  python3 - "$work/gw.json" "$gw" "$up" "$tenant" "$workers" <<'PY'
import json, sys
path, port, up, tenant, workers = sys.argv[1:]
json.dump({"listen": f"127.0.0.1:{port}", "workers": int(workers), "state_dir": f"{path}.state",
           "clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789", "tenants": [tenant]}],
           "tenants": [{"id": tenant, "upstreams": [{"base_url": f"http://127.0.0.1:{up}/fhir", "fhir_version": "3.0"}]}],
           "secret_hashing": {"memory_kib": 8, "iterations": 1}}, open(path, "w"))
PY
  RUST_LOG=warn "$bin/tower-fhir-gateway" --config "$work/gw.json" >"$work/gw.log" 2>&1 &
  local pid=$!
  wait_port "$gw"
  local token
  token=$(curl -s -X POST "http://127.0.0.1:$gw/oauth/token" \
    -d "grant_type=client_credentials&client_id=bench&client_secret=bench-secret-0123456789&scope=$tenant" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$gw/Patient/123" >"$work/wrk.$workers.$round.txt"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$work/gw.json.state"
  local rps non
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.$workers.$round.txt")
  non=$(grep -c "Non-2xx" "$work/wrk.$workers.$round.txt" || true)
  if [ "$non" != 0 ]; then
    echo "round $round, workers $workers: non-2xx answers; the figures are not valid" >&2
    cat "$work/wrk.$workers.$round.txt" >&2
    exit 1
  fi
  printf '  workers %-3s %10.0f req/s\n' "$workers" "$rps"
  echo "$rps" >"$work/rps.$workers.$round"
}

echo "$cpus CPUs; wrk -t2 -c$CONNECTIONS, ${DURATION}s a run; gateway, upstream and wrk unpinned"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  if (( round % 2 )); then one 1 "$round"; one "$many" "$round"; else one "$many" "$round"; one 1 "$round"; fi
done
python3 - "$work" "$ROUNDS" "$many" <<'PY'
import statistics, sys
work, rounds, many = sys.argv[1], int(sys.argv[2]), sys.argv[3]
read = lambda w, r: float(open(f"{work}/rps.{w}.{r}").read())
one = [read(1, r) for r in range(1, rounds + 1)]
n = [read(many, r) for r in range(1, rounds + 1)]
ratios = [b / a for a, b in zip(one, n)]
print(f"medians: workers 1 {statistics.median(one):,.0f} req/s, workers {many} {statistics.median(n):,.0f} req/s")
print(f"workers {many} / workers 1: {statistics.median(ratios):.2f}x (median of the rounds' ratios)")
PY
