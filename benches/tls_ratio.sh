#!/usr/bin/env bash
# What TLS on the gateway's own listener (`tls_certificate_file`) costs a request: the same
# release build served twice, plain and with TLS (a throwaway self-signed certificate), in
# front of the same fixed upstream, each driven by fhir-loadgen in turn (the order alternating
# round by round), the gateway pinned to one CPU and the load side to the other. Per round it
# reads the requests each served and the CPU time it spent (all its threads, from /proc), and
# prints the medians: requests/s and CPU a request, TLS against plain.
#
# The connections are kept open (a closed loop of CONNECTIONS), so the handshakes are made
# once, at the start of a round: this is the cost of encrypting requests and answers, which is
# what a gateway behind keep-alive clients pays. HTTP/2 over TLS with HTTP2=1.
#
#   bash benches/tls_ratio.sh
#   ROUNDS=8 DURATION=8 HTTP2=1 bash benches/tls_ratio.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-6}; WARMUP=${WARMUP:-2}; CONNECTIONS=${CONNECTIONS:-32}; ROUNDS=${ROUNDS:-6}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}; HTTP2=${HTTP2:-0}
# shellcheck source=benches/harness.sh
. benches/harness.sh
bin=${CARGO_TARGET_DIR:-target}/release
need openssl openssl
tenant=00000000-0000-4000-8000-000000000000
up=$(port); plain=$(port); tls=$(port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
taskset -c "$CLIENT_CPU" "$bin/bench_servers" upstream --listen "127.0.0.1:$up" >/dev/null &
upstream_pid=$!; pids+=($!)
python3 - "$work" "$plain" "$tls" "$up" "$tenant" <<'PY'
import json, sys
work, plain, tls, up, tenant = sys.argv[1:]
base = {"clients": [{"client_id": "bench", "client_secret": "bench-secret-0123456789", "tenants": [tenant]}],
        "tenants": [{"id": tenant, "upstreams": [{"base_url": f"http://127.0.0.1:{up}/fhir", "fhir_version": "3.0"}]}],
        "secret_hashing": {"memory_kib": 8, "iterations": 1}, "workers": 1}
json.dump(dict(base, listen=f"127.0.0.1:{plain}", state_dir=f"{work}/state-plain"), open(f"{work}/plain.json", "w"))
json.dump(dict(base, listen=f"127.0.0.1:{tls}", state_dir=f"{work}/state-tls",
               tls_certificate_file=f"{work}/cert.pem", tls_private_key_file=f"{work}/key.pem"),
          open(f"{work}/tls.json", "w"))
PY
declare -A pid portof url
portof[plain]=$plain; portof[tls]=$tls
url[plain]="http://127.0.0.1:$plain"; url[tls]="https://localhost:$tls"
for name in plain tls; do
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$bin/tower-fhir-gateway" --config "$work/$name.json" \
    >"$work/$name.log" 2>&1 &
  pid[$name]=$!; pids+=($!)
done
for name in plain tls; do wait_port "${portof[$name]}"; done
http2=(); [ "$HTTP2" = 1 ] && http2=(--http2)
run() { # NAME ROUND
  taskset -c "$CLIENT_CPU" "$bin/fhir-loadgen" --target "${url[$1]}" --insecure "${http2[@]}" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" --json --tenants "$tenant" \
    --token-url "${url[$1]}/oauth/token" --client-id bench --client-secret bench-secret-0123456789 \
    --cpu-of "server=${pid[$1]}" >"$work/$1-$2.json" 2>"$work/$1-$2.err" ||
    { cat "$work/$1-$2.err"; exit 1; }
}
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="plain tls"; else order="tls plain"; fi
  for name in $order; do run "$name" "$r"; done
done
python3 - "$work" "$ROUNDS" "$HTTP2" <<'PY'
import json, statistics, sys
work, rounds, http2 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rows = {"plain": [], "tls": []}
for r in range(1, rounds + 1):
    for name in rows:
        report = json.load(open(f"{work}/{name}-{r}.json"))
        assert report["error_count"] == 0, report["errors"]
        rows[name].append((report["requests_per_second"], report["cpu_us_per_request"]["server"]))
print(f"{'HTTP/2' if http2 else 'HTTP/1.1'}, {rounds} rounds")
print(f"{'':>6} {'req/s (median)':>15} {'server CPU µs a request (median)':>34}")
for name, values in rows.items():
    print(f"{name:>6} {statistics.median(v[0] for v in values):>15.0f} "
          f"{statistics.median(v[1] for v in values):>34.2f}")
ratios = [t[1] / p[1] for p, t in zip(rows["plain"], rows["tls"])]
speed = [t[0] / p[0] for p, t in zip(rows["plain"], rows["tls"])]
print(f"TLS/plain: CPU a request {statistics.median(ratios):.3f} "
      f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); req/s {statistics.median(speed):.3f}")
PY
