#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the gateway against the bare
# hyper pass-through, on the same fixed upstream and load. Unlike req/s, the counts repeat from
# run to run whatever the machine's neighbours do, so a change of a few percent is visible.
#
#   bash benches/instructions.sh              # 4,000 requests each, after 500 to warm up
#   REQUESTS=10000 bash benches/instructions.sh
#
# The gateway is counted twice: as configured by default (no metrics, no audit log), and with
# `metrics_listen` and `audit_log` on (every request counted in the Prometheus recorder and
# written to the audit file by its thread, whose instructions count too). As in ops_ratio.sh,
# AUDIT=file|null|none and METRICS=1|0 say what the second one has:
#
#   AUDIT=none bash benches/instructions.sh            # metrics alone
#   METRICS=0 bash benches/instructions.sh             # the audit log alone
#
# Each server runs under callgrind (about 50 times slower, one thread); the counters are zeroed
# after the warm-up and dumped after the measured requests, so start-up, the token fetch for the
# warm-up and the shutdown are not counted. The token endpoint's Argon2 check and signing for
# the measured run's one token are (a few hundred instructions a request at 4,000 requests).
# Only user-space instructions are counted: the kernel's share (the same syscalls for both,
# two reads and two writes a request) is not.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-4000}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-500}
CONNECTIONS=${CONNECTIONS:-4}
AUDIT=${AUDIT:-file}; METRICS=${METRICS:-1}

# shellcheck source=benches/harness.sh
. benches/harness.sh
# (The harness's build honours CARGO_TARGET_DIR: so do the binaries run here.)
bin=${CARGO_TARGET_DIR:-target}/release
need valgrind valgrind

tenant=00000000-0000-4000-8000-000000000000
upstream_port=$(port)
gateway_port=$(port)
ops_port=$(port)
metrics_port=$(port)
passthrough_port=$(port)
"$bin/bench_servers" upstream --listen "127.0.0.1:$upstream_port" >/dev/null &
pids+=($!)
python3 - "$work" "$gateway_port" "$upstream_port" "$tenant" "$ops_port" \
  "$(ops_keys "$metrics_port" "$work/audit.jsonl")" <<'PY'
import json, sys
work, gateway, upstream, tenant, ops, ops_keys = sys.argv[1:]
config = {
    "listen": f"127.0.0.1:{gateway}",
    "state_dir": f"{work}/state",
    "clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789",
                 "tenants": [tenant]}],
    "tenants": [{"id": tenant, "upstreams": [
        {"base_url": f"http://127.0.0.1:{upstream}/fhir", "fhir_version": "3.0"}]}],
    "secret_hashing": {"memory_kib": 8, "iterations": 1},
}
json.dump(config, open(f"{work}/gateway.json", "w"))
config.update({"listen": f"127.0.0.1:{ops}", "state_dir": f"{work}/state-ops"},
              **json.loads(ops_keys))
json.dump(config, open(f"{work}/gateway-ops.json", "w"))
PY
wait_port "$upstream_port"

# count NAME PID TARGET: the instructions PID runs for the measured requests to TARGET.
count() {
  local name=$1 pid=$2 target=$3
  local token_port=${4:-$gateway_port}
  local load=(--target "$target" --connections "$CONNECTIONS" --warmup 0
    --token-url "http://127.0.0.1:$token_port/oauth/token" --client-id bench
    --client-secret bench-secret-0123456789 --tenants "$tenant")
  "$bin/fhir-loadgen" "${load[@]}" --requests "$WARMUP_REQUESTS" >/dev/null 2>&1
  callgrind_control --zero "$pid" >/dev/null 2>&1
  local measured
  measured=$("$bin/fhir-loadgen" "${load[@]}" --requests "$REQUESTS" --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  callgrind_control --dump "$pid" >/dev/null 2>&1
  sleep 1
  local total
  total=$(callgrind_annotate "$(ls -t "$work"/cg."$name".*.1 | head -n 1)" 2>/dev/null |
    awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$name $measured $total"
}

# The gateway under callgrind (it is also the token endpoint for both runs).
valgrind --tool=callgrind --callgrind-out-file="$work/cg.gateway.%p" \
  "$bin/tower-fhir-gateway" --config "$work/gateway.json" >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
wait_port "$gateway_port"
read -r _ gw_requests gw_total < <(count gateway "$gateway_pid" "http://127.0.0.1:$gateway_port")

# The same with metrics and the audit log on (its own state: its own token endpoint).
valgrind --tool=callgrind --callgrind-out-file="$work/cg.ops.%p" \
  "$bin/tower-fhir-gateway" --config "$work/gateway-ops.json" >"$work/gateway-ops.log" 2>&1 &
ops_pid=$!
pids+=($ops_pid)
wait_port "$ops_port"
read -r _ ops_requests ops_total < <(count ops "$ops_pid" "http://127.0.0.1:$ops_port" "$ops_port")
audited=0
if [[ -f $work/audit.jsonl ]]; then audited=$(wc -l <"$work/audit.jsonl"); fi

valgrind --tool=callgrind --callgrind-out-file="$work/cg.passthrough.%p" \
  "$bin/bench_servers" passthrough --listen "127.0.0.1:$passthrough_port" \
  --upstream "http://127.0.0.1:$upstream_port" >"$work/passthrough.log" 2>&1 &
passthrough_pid=$!
pids+=($passthrough_pid)
wait_port "$passthrough_port"
read -r _ pt_requests pt_total < <(count passthrough "$passthrough_pid" "http://127.0.0.1:$passthrough_port/fhir")

python3 - "$gw_requests" "$gw_total" "$pt_requests" "$pt_total" "$ops_requests" "$ops_total" "$audited" "$AUDIT" "$METRICS" <<'PY'
import sys
gw_n, gw_i, pt_n, pt_i, ops_n, ops_i, audited = map(int, sys.argv[1:8])
audit, with_metrics = sys.argv[8:]
on = " and ".join(([] if with_metrics != "1" else ["metrics"])
                  + ([] if audit == "none" else [f"audit log ({audit})"])) or "nothing more"
gw, pt, ops = gw_i / gw_n, pt_i / pt_n, ops_i / ops_n
print()
print("| server | requests | instructions | per request |")
print("|---|---:|---:|---:|")
print(f"| bare hyper pass-through | {pt_n:,} | {pt_i:,} | {pt:,.0f} |")
print(f"| gateway | {gw_n:,} | {gw_i:,} | {gw:,.0f} |")
print(f"| gateway, {on} | {ops_n:,} | {ops_i:,} | {ops:,.0f} |")
print()
print(f"gateway / pass-through instructions per request: {gw / pt:.3f}x")
print(f"gateway with {on} / gateway: {ops / gw:.3f}x ({audited:,} audit records written)")
PY

# PROFILES=DIR keeps the three callgrind profiles there, for `callgrind_annotate --inclusive=yes`.
if [[ -n ${PROFILES:-} ]]; then
  mkdir -p "$PROFILES"
  cp "$work"/cg.*.1 "$PROFILES"/
fi
