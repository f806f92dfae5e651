# Sourced by compare.sh, instructions.sh and ops_ratio.sh: the release build of the gateway, the load generator and the bench servers, a work folder
# and the processes to end on exit, Debian packages when missing, a free port, and waiting
# for one to listen.
# A script may define `before_cleanup` to end more on exit.

cargo build --quiet --release -p tower-fhir-gateway -p fhir-loadgen
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() {
  if declare -F before_cleanup >/dev/null; then before_cleanup; fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # (valgrind writes its last files as it exits: let it finish before the folder goes.)
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# need COMMAND PACKAGE: installs the Debian PACKAGE if COMMAND is missing.
need() {
  command -v "$1" >/dev/null && return 0
  echo "installing $2 (Debian)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT: until something listens on PORT (a minute at most: valgrind starts slowly).
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}
# ops_keys METRICS_PORT AUDIT_FILE: the gateway config keys, as a JSON object, that AUDIT
# (file, the default: `audit_log` AUDIT_FILE; null: /dev/null; none) and METRICS (1, the
# default: `metrics_listen` on METRICS_PORT; 0) ask for.
ops_keys() {
  python3 - "$1" "$2" "${AUDIT:-file}" "${METRICS:-1}" <<'PY'
import json, sys
metrics_port, audit_file, audit, with_metrics = sys.argv[1:]
keys = {}
if with_metrics == "1":
    keys["metrics_listen"] = f"127.0.0.1:{metrics_port}"
if audit == "file":
    keys["audit_log"] = audit_file
elif audit == "null":
    keys["audit_log"] = "/dev/null"
elif audit != "none":
    sys.exit(f"AUDIT is file, null or none, not {audit!r}")
print(json.dumps(keys))
PY
}
# token_of PORT SCOPE: an access token from the gateway's token endpoint on PORT for the bench
# client (the configs here name it `bench`), with SCOPE.
token_of() {
  curl -s -X POST "http://127.0.0.1:$1/oauth/token" \
    -d "grant_type=client_credentials&client_id=bench&client_secret=bench-secret-0123456789&scope=$2" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
