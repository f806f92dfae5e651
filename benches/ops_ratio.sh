#!/usr/bin/env bash
# Requests/s of the gateway with `metrics_listen` and `audit_log` on against the same build with
# them off: both servers side by side on CPU $SERVER_CPU (one worker each), the load generator
# and the fixed upstream on $CLIENT_CPU, as benches/compare.sh runs them. ROUNDS rounds, each
# measuring both in turn (every other round in reverse order), the ratio taken within each
# round and the median reported, with the server CPU time a request (from /proc).
#
#   bash benches/ops_ratio.sh
#   ROUNDS=8 DURATION=10 bash benches/ops_ratio.sh
#   BASE_TARGET_DIR=/path/to/other/target bash benches/ops_ratio.sh   # also another build's
#                                        # release binaries, in the same rounds
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}; WARMUP=${WARMUP:-2}; CONNECTIONS=${CONNECTIONS:-32}; ROUNDS=${ROUNDS:-6}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}
# shellcheck source=benches/harness.sh
. benches/harness.sh
bin=${CARGO_TARGET_DIR:-target}/release
base_bin=${BASE_TARGET_DIR:-}/release
tenant=00000000-0000-4000-8000-000000000000
up=$(port); off=$(port); on=$(port); metrics=$(port); boff=$(port); bon=$(port); bmetrics=$(port)
taskset -c "$CLIENT_CPU" "$bin/bench_servers" upstream --listen "127.0.0.1:$up" >/dev/null & upstream_pid=$!; pids+=($!)
python3 - "$work" "$off" "$on" "$up" "$tenant" "$metrics" "$boff" "$bon" "$bmetrics" <<'PY'
import json, sys
work, off, on, up, tenant, metrics, boff, bon, bmetrics = sys.argv[1:]
base = {"clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789", "tenants": [tenant]}],
        "tenants": [{"id": tenant, "upstreams": [{"base_url": f"http://127.0.0.1:{up}/fhir", "fhir_version": "3.0"}]}],
        "secret_hashing": {"memory_kib": 8, "iterations": 1}}
json.dump(dict(base, listen=f"127.0.0.1:{off}", state_dir=f"{work}/state-off"), open(f"{work}/off.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{on}", state_dir=f"{work}/state-on", metrics_listen=f"127.0.0.1:{metrics}",
               audit_log=f"{work}/audit.jsonl"), open(f"{work}/on.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{boff}", state_dir=f"{work}/state-boff"), open(f"{work}/base-off.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{bon}", state_dir=f"{work}/state-bon", metrics_listen=f"127.0.0.1:{bmetrics}",
               audit_log=f"{work}/base-audit.jsonl"), open(f"{work}/base-on.json", "w"))
PY
declare -A pid
names="off on"
[ -n "${BASE_TARGET_DIR:-}" ] && names="off on base-off base-on"
for name in $names; do
  b=$bin; [[ $name == base-* ]] && b=$base_bin
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$b/tower-fhir-gateway" --config "$work/$name.json" >"$work/$name.log" 2>&1 &
  pid[$name]=$!; pids+=($!)
done
declare -A portof=([off]=$off [on]=$on [base-off]=$boff [base-on]=$bon)
wait_port "$up"; for name in $names; do wait_port "${portof[$name]}"; done
run() { # NAME ROUND
  local p=${portof[$1]}
  taskset -c "$CLIENT_CPU" "$bin/fhir-loadgen" --target "http://127.0.0.1:$p" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --tenants "$tenant" \
    --token-url "http://127.0.0.1:$p/oauth/token" --client-id bench --client-secret bench-secret-0123456789 \
    --cpu-of "server=${pid[$1]}" --cpu-of "upstream=$upstream_pid" >"$work/$1-$2.json" 2>"$work/$1-$2.err" ||
    { cat "$work/$1-$2.err"; exit 1; }
}
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order=$names; else order=$(echo $names | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for name in $order; do run "$name" "$r"; done
done
audited=$(wc -l <"$work/audit.jsonl")
for prefix in "" ${BASE_TARGET_DIR:+base-}; do
echo "== ${prefix:-this build }"
python3 - "$work" "$ROUNDS" "$audited" "$prefix" <<'PY'
import json, statistics, sys
work, rounds, audited, p = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = []
for r in range(1, rounds + 1):
    off = json.load(open(f"{work}/{p}off-{r}.json")); on = json.load(open(f"{work}/{p}on-{r}.json"))
    for x in (off, on):
        bad = sum(x["errors"].values()) + sum(v for k, v in x["statuses"].items() if k != "200")
        assert bad == 0, x
    rps = on["requests_per_second"] / off["requests_per_second"]
    cpu = on["cpu_us_per_request"]["server"] / off["cpu_us_per_request"]["server"]
    rows.append((rps, cpu))
    print(f"round {r}: off {off['requests_per_second']:8.0f} req/s ({off['cpu_us_per_request']['server']:.1f} us server CPU)  "
          f"on {on['requests_per_second']:8.0f} req/s ({on['cpu_us_per_request']['server']:.1f} us)  on/off {rps:.3f}  server CPU a request on/off {cpu:.3f}")
print(f"median on/off req/s: {statistics.median(r[0] for r in rows):.3f}   median on/off server CPU a request: {statistics.median(r[1] for r in rows):.3f}"
      + ("" if p else f"   ({audited:,} audit records written)"))
PY
done
