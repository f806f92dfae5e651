#!/usr/bin/env bash
# The cost of `metrics_listen` and `audit_log`: the gateway with them on against the same build
# with them off, one worker each, on CPU $SERVER_CPU; the load and the fixed upstream on
# $CLIENT_CPU.
#
# MODE=together (the default): both gateways serve at once, each under its own wrk (-t1
# -c$CONNECTIONS, GET /Patient/123 with a token) for ROUNDS rounds of DURATION seconds. They
# share the CPU and whatever else slows the machine down at that moment, so a round's ratios
# hold still where one-after-the-other rounds move by 10% and more on a shared machine. Per
# round it reads each server's CPU time (all its threads, the audit writer's included, from
# /proc) and requests served, and reports the medians of: CPU a request on/off (the cost: the
# requests/s a CPU serves with them on is its inverse) and requests on/off (in which the "on"
# server also gets the CPU its extra threads take from the shared one, so it flatters them).
#
# LOAD=loadgen: the same, each server under its own fhir-loadgen (the deployed clients' request
# mix, a token per tenant from each gateway's token endpoint) instead of wrk's one small read;
# the load generator then sets the pace, so read the CPU a request, not the requests.
#
# MODE=turns: one after the other, each alone on $SERVER_CPU under wrk (or, with LOAD=loadgen,
# fhir-loadgen's request mix, as benches/compare.sh runs its targets), the order alternating
# round by round; the server's CPU a request from /proc (wrk) or fhir-loadgen's --cpu-of. Each
# server then has the CPU to itself, as a deployed one does, where "together" shares it; with
# wrk it is the steadier of the two in turns. With BASE_TARGET_DIR both builds' pairs take
# part in every round.
#
# What the "on" server has: AUDIT=file (the default; `audit_log` a file in the work folder),
# null (/dev/null: the records made and written, not stored) or none; METRICS=1 (the default)
# or 0 (`metrics_listen`). So the cost can be taken apart:
#
#   bash benches/ops_ratio.sh
#   LOAD=loadgen bash benches/ops_ratio.sh          # the request mix, both at once
#   AUDIT=none bash benches/ops_ratio.sh            # metrics alone
#   AUDIT=null METRICS=0 bash benches/ops_ratio.sh  # the audit records, not their file
#   ROUNDS=12 DURATION=10 bash benches/ops_ratio.sh
#   MODE=turns bash benches/ops_ratio.sh                # each alone, in turns, under wrk
#   MODE=turns LOAD=loadgen bash benches/ops_ratio.sh   # the same under fhir-loadgen
#   BASE_TARGET_DIR=/path/to/other/target bash benches/ops_ratio.sh   # also another build's
#                                        # release binaries, round by round beside this one
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-together}; LOAD=${LOAD:-wrk}; AUDIT=${AUDIT:-file}; METRICS=${METRICS:-1}
DURATION=${DURATION:-8}; WARMUP=${WARMUP:-2}; CONNECTIONS=${CONNECTIONS:-32}; ROUNDS=${ROUNDS:-6}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}
# shellcheck source=benches/harness.sh
. benches/harness.sh
bin=${CARGO_TARGET_DIR:-target}/release
base_bin=${BASE_TARGET_DIR:-}/release
tenant=00000000-0000-4000-8000-000000000000
up=$(port); off=$(port); on=$(port); metrics=$(port); boff=$(port); bon=$(port); bmetrics=$(port)
taskset -c "$CLIENT_CPU" "$bin/bench_servers" upstream --listen "127.0.0.1:$up" >/dev/null & upstream_pid=$!; pids+=($!)
python3 - "$work" "$off" "$on" "$up" "$tenant" "$boff" "$bon" \
  "$(ops_keys "$metrics" "$work/audit.jsonl")" "$(ops_keys "$bmetrics" "$work/base-audit.jsonl")" <<'PY'
import json, sys
work, off, on, up, tenant, boff, bon, on_keys, base_on_keys = sys.argv[1:]
base = {"clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789", "tenants": [tenant]}],
        "tenants": [{"id": tenant, "upstreams": [{"base_url": f"http://127.0.0.1:{up}/fhir", "fhir_version": "3.0"}]}],
        "secret_hashing": {"memory_kib": 8, "iterations": 1}}
json.dump(dict(base, listen=f"127.0.0.1:{off}", state_dir=f"{work}/state-off"), open(f"{work}/off.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{on}", state_dir=f"{work}/state-on", **json.loads(on_keys)),
          open(f"{work}/on.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{boff}", state_dir=f"{work}/state-boff"), open(f"{work}/base-off.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{bon}", state_dir=f"{work}/state-bon", **json.loads(base_on_keys)),
          open(f"{work}/base-on.json", "w"))
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
if [ "$MODE" = together ]; then
  if [ "$LOAD" = wrk ]; then need wrk wrk; fi
  cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system clock ticks, all threads
  load() { # NAME TOKEN SECONDS: wrk's request count (nothing when an answer was not 2xx)
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$3s" -H "Authorization: Bearer $2" \
      "http://127.0.0.1:${portof[$1]}/Patient/123" |
      awk '/requests in/ {n = $1} /Non-2xx|Socket errors/ {bad = 1} END {if (!bad) print n}'
  }
  # LOAD=loadgen: the deployed clients' request mix from fhir-loadgen instead of wrk's one read,
  # which reads the server's CPU for its measured requests itself (after its warm-up second).
  # Prints "REQUESTS CPU_TICKS" for them (the ticks at 100 a second, as /proc counts them).
  mixed() { # NAME SECONDS
    local p=${portof[$1]}
    taskset -c "$CLIENT_CPU" "$bin/fhir-loadgen" --target "http://127.0.0.1:$p" --connections "$CONNECTIONS" \
      --duration "$2" --warmup 1 --json --tenants "$tenant" \
      --token-url "http://127.0.0.1:$p/oauth/token" --client-id bench --client-secret bench-secret-0123456789 \
      --cpu-of "server=${pid[$1]}" 2>"$work/$1.err" | python3 -c '
import json, sys
x = json.load(sys.stdin)
bad = sum(x["errors"].values()) + sum(v for k, v in x["statuses"].items() if k != "200")
if not bad:
    print(x["requests"], x["requests"] * x["cpu_us_per_request"]["server"] / 1e4)'
  }
  pairs=("off on"); [ -n "${BASE_TARGET_DIR:-}" ] && pairs+=("base-off base-on")
  load_name="wrk -t1 -c$CONNECTIONS"; [ "$LOAD" = loadgen ] && load_name="fhir-loadgen --connections $CONNECTIONS"
  echo "both at once on CPU $SERVER_CPU, $load_name each on CPU $CLIENT_CPU, ${DURATION}s rounds; on: AUDIT=$AUDIT METRICS=$METRICS"
  declare -A token
  for name in $names; do token[$name]=$(token_of "${portof[$name]}" "$tenant"); done
  # load_pair A B SECONDS ROUND: both at once; A's and B's requests and CPU ticks into $work/A.rounds.
  load_pair() {
    local a=$1 b=$2 ca cb
    if [ "$LOAD" = loadgen ]; then
      mixed "$a" "$3" >"$work/$a.$4" & local other=$!
      mixed "$b" "$3" >"$work/$b.$4"; wait "$other"
      read -r na ta <"$work/$a.$4" || true; read -r nb tb <"$work/$b.$4" || true
      echo "$na $nb $ta $tb" >>"$work/$a.rounds"
      return
    fi
    ca=$(cpu "${pid[$a]}"); cb=$(cpu "${pid[$b]}")
    load "$a" "${token[$a]}" "$3" >"$work/$a.$4" & local other=$!
    load "$b" "${token[$b]}" "$3" >"$work/$b.$4"; wait "$other"
    echo "$(cat "$work/$a.$4") $(cat "$work/$b.$4") $(( $(cpu "${pid[$a]}") - ca )) $(( $(cpu "${pid[$b]}") - cb ))" >>"$work/$a.rounds"
  }
  # The pairs take turns round by round, so both builds meet the same stretch of the run.
  for pair in "${pairs[@]}"; do load_pair $pair "$WARMUP" warmup; : >"$work/${pair%% *}.rounds"; done
  for r in $(seq 1 "$ROUNDS"); do
    for pair in "${pairs[@]}"; do load_pair $pair "$DURATION" "$r"; done
  done
  for pair in "${pairs[@]}"; do
    read -r a b <<<"$pair"
    echo "== ${a%off}build"
    python3 - "$work/$a.rounds" "$DURATION" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
assert all(len(r) == 4 for r in rows), f"a run had answers other than 2xx: {rows}"
seconds = float(sys.argv[2])
for i, (n_off, n_on, c_off, c_on) in enumerate(([float(x) for x in r] for r in rows), 1):
    print(f"round {i}: off {n_off / seconds:7.0f} req/s  on {n_on / seconds:7.0f} req/s  "
          f"requests on/off {n_on / n_off:.3f}  CPU a request on/off {(c_on / n_on) / (c_off / n_off):.3f}")
rq = statistics.median(float(r[1]) / float(r[0]) for r in rows)
cost = statistics.median((float(r[3]) / float(r[1])) / (float(r[2]) / float(r[0])) for r in rows)
print(f"median CPU a request on/off: {cost:.3f} (requests/s a CPU serves with them on: {1 / cost:.3f}x)   "
      f"median requests on/off: {rq:.3f}")
PY
  done
  exit 0
fi
if [ "$LOAD" = wrk ]; then
  need wrk wrk
  echo "each alone on CPU $SERVER_CPU in turns, wrk -t1 -c$CONNECTIONS on CPU $CLIENT_CPU, ${DURATION}s rounds; on: AUDIT=$AUDIT METRICS=$METRICS"
  cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system clock ticks, all threads
  declare -A token
  for name in $names; do token[$name]=$(token_of "${portof[$name]}" "$tenant"); done
  # alone NAME SECONDS: wrk's run against NAME alone, as the summary below reads fhir-loadgen's
  # report (requests/s, the server's CPU a request from /proc; a status "other" when wrk saw
  # an answer other than 2xx).
  alone() {
    local c0 n
    c0=$(cpu "${pid[$1]}")
    n=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$2s" -H "Authorization: Bearer ${token[$1]}" \
      "http://127.0.0.1:${portof[$1]}/Patient/123" |
      awk '/requests in/ {n = $1} /Non-2xx|Socket errors/ {bad = 1} END {print bad ? 0 : n}')
    python3 -c '
import json, sys
n, ticks, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
print(json.dumps({"requests_per_second": n / seconds, "errors": {},
                  "statuses": {"200": n} if n else {"other": 1},
                  "cpu_us_per_request": {"server": ticks * 1e4 / max(n, 1)}}))' \
      "$n" "$(( $(cpu "${pid[$1]}") - c0 ))" "$2"
  }
  for name in $names; do alone "$name" "$WARMUP" >/dev/null; done
  run() { alone "$1" "$DURATION" >"$work/$1-$2.json"; } # NAME ROUND
else
run() { # NAME ROUND
  local p=${portof[$1]}
  taskset -c "$CLIENT_CPU" "$bin/fhir-loadgen" --target "http://127.0.0.1:$p" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --tenants "$tenant" \
    --token-url "http://127.0.0.1:$p/oauth/token" --client-id bench --client-secret bench-secret-0123456789 \
    --cpu-of "server=${pid[$1]}" --cpu-of "upstream=$upstream_pid" >"$work/$1-$2.json" 2>"$work/$1-$2.err" ||
    { cat "$work/$1-$2.err"; exit 1; }
}
fi
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order=$names; else order=$(echo $names | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for name in $order; do run "$name" "$r"; done
done
audited=$(cat "$work/audit.jsonl" 2>/dev/null | wc -l)
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
