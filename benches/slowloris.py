#!/usr/bin/env python3
"""Slowloris against the release gateway: many connections each send half a request head and
hold it; meanwhile a normal client keeps asking `GET /metadata`. Prints how long the server
took to close the held connections (it should be about `header_read_timeout_seconds`) and the
normal client's latency during the attack.

With `--stalled`, each held connection instead asks for many responses at once (pipelined
`GET /metadata`s, about 1 KB each) and never reads them, with a 4 KiB receive buffer: the
gateway's writes find no room, and it should drop the connection (a reset) about
`idle_timeout_seconds` after that. Also prints the gateway's resident memory at its peak.

With `--slow-body`, each held connection is an authenticated client (a token from the
gateway's token endpoint) that sends the head of a `POST /Patient` with `Content-Length: 1000`
and its first 16 bytes, then nothing: the gateway should answer each `408` and close it about
`body_read_timeout_seconds` after that. The tenant's upstream is a small FHIR stand-in started
here that reads every body whole before answering, as FHIR servers do; it reports how many
whole bodies it received (none of the held ones should arrive whole). With `--dribble S` too,
each held connection sends one more byte every S seconds, never pausing a whole timeout: the
gateway's `body_min_bytes_per_second` (`--min-rate`, default 500) should close them about one
timeout after their first bytes; with `--min-rate 0` nothing bounds them.

    cargo build --release -p tower-fhir-gateway
    python3 benches/slowloris.py                        # 2,000 connections, a 5 s timeout
    python3 benches/slowloris.py --connections 5000 --header-timeout 10
    python3 benches/slowloris.py --stalled              # 200 that stop reading, a 5 s timeout
    python3 benches/slowloris.py --slow-body            # 500 bodies that stop, a 5 s timeout
    python3 benches/slowloris.py --slow-body --dribble 2   # 500 bodies sending a byte every 2 s

The binary is `$CARGO_TARGET_DIR/release/tower-fhir-gateway` (`target/` without the variable)
unless `--gateway` names another. Each held connection takes a file descriptor here and one in
the gateway: `ulimit -n` must exceed `--connections` by a few dozen.
"""

import argparse
import http.server
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

HALF_HEAD = b"GET /metadata HTTP/1.1\r\nHost: x\r\n"
METADATA = b"GET /metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
METADATA_KEPT = b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n"


TENANT = "5b0d1e2f-0000-4000-8000-00000000b0d1"
SECRET = "slowloris-client-secret-0123456789"


class Upstream(http.server.BaseHTTPRequestHandler):
    """A FHIR stand-in: reads each request's body whole, then answers."""
    protocol_version = "HTTP/1.1"
    whole_bodies = 0

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200, b'{"resourceType":"Patient","id":"1"}')

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if len(body) < length:
            return
        Upstream.whole_bodies += 1
        self.answer(201, b'{"resourceType":"Patient","id":"2"}')

    def log_message(self, *args):
        pass


def token(addr):
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": "slow",
                                   "client_secret": SECRET, "scope": TENANT}).encode()
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/oauth/token", form, timeout=10) as r:
        return json.load(r)["access_token"]


def tcp_state(s):
    """The socket's TCP state from TCP_INFO (7 is closed: the peer reset it)."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def normal_client(addr, stop, latencies, failures):
    """GET /metadata on a fresh connection every 100 ms until `stop` is set."""
    while not stop.is_set():
        began = time.monotonic()
        try:
            with socket.create_connection(addr, timeout=10) as s:
                s.sendall(METADATA)
                answer = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            if answer.startswith(b"HTTP/1.1 200"):
                latencies.append(time.monotonic() - began)
            else:
                failures.append(answer[:40])
        except OSError as e:
            failures.append(repr(e))
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int,
                        help="default 2,000 (200 with --stalled, 500 with --slow-body)")
    parser.add_argument("--header-timeout", type=int, default=5,
                        help="the gateway's header_read_timeout_seconds")
    parser.add_argument("--stalled", action="store_true",
                        help="connections that ask for responses and never read them")
    parser.add_argument("--idle-timeout", type=int, default=5,
                        help="the gateway's idle_timeout_seconds (with --stalled)")
    parser.add_argument("--slow-body", action="store_true",
                        help="authenticated requests whose bodies stop arriving")
    parser.add_argument("--body-timeout", type=int, default=5,
                        help="the gateway's body_read_timeout_seconds (with --slow-body)")
    parser.add_argument("--dribble", type=float,
                        help="with --slow-body: send one more byte every this many seconds")
    parser.add_argument("--min-rate", type=int, default=500,
                        help="the gateway's body_min_bytes_per_second (with --slow-body)")
    parser.add_argument("--requests", type=int, default=3000,
                        help="pipelined requests per stalled connection")
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    parser.add_argument("--gateway", default=os.path.join(target, "release", "tower-fhir-gateway"))
    args = parser.parse_args()
    if args.connections is None:
        args.connections = 200 if args.stalled else 500 if args.slow_body else 2000

    keys = {}
    upstream = None
    if args.slow_body:
        # A listen backlog for every held connection (the default 5 would hold new upstream
        # connections back a second in SYN retries, and so the bodies' first reads).
        http.server.ThreadingHTTPServer.request_queue_size = 4096
        upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        upstream.daemon_threads = True
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        keys = {"body_read_timeout_seconds": args.body_timeout,
                "body_min_bytes_per_second": args.min_rate,
                "clients": [{"client_id": "slow", "client_secret": SECRET, "tenants": [TENANT]}],
                "tenants": [{"id": TENANT, "upstreams": [{
                    "base_url": f"http://127.0.0.1:{upstream.server_address[1]}/fhir",
                    "fhir_version": "4.0"}]}],
                "secret_hashing": {"memory_kib": 8, "iterations": 1}}

    work = tempfile.mkdtemp(prefix="slowloris-")
    config = os.path.join(work, "gateway.json")
    with open(config, "w") as f:
        json.dump({"listen": "127.0.0.1:0", "state_dir": os.path.join(work, "state"),
                   "header_read_timeout_seconds": args.header_timeout,
                   "idle_timeout_seconds": args.idle_timeout, **keys}, f)
    log = open(os.path.join(work, "gateway.log"), "w")
    gateway = subprocess.Popen([args.gateway, "--config", config], stdout=subprocess.PIPE,
                               stderr=log, env={**os.environ, "RUST_LOG": "warn"}, text=True)
    try:
        prefix = "tower-fhir gateway listening on http://"
        line = ""
        while not line.startswith(prefix):
            line = gateway.stdout.readline()
            if not line:
                sys.exit(f"the gateway did not start; see {log.name}")
        host, port = line[len(prefix):].strip().rsplit(":", 1)
        addr = (host, int(port))

        selector = selectors.DefaultSelector()
        sent_at = {}
        first_bytes = {}
        if args.slow_body:
            bearer = token(addr)
            head = ("POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n"
                    "Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n"
                    '{{"resourceType":').format(bearer).encode()
        began = time.monotonic()
        peak_rss = rss_mib(gateway.pid)
        for _ in range(args.connections):
            if args.stalled:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(10)
                s.connect(addr)
                s.sendall(METADATA_KEPT * args.requests)
            elif args.slow_body:
                s = socket.create_connection(addr, timeout=10)
                s.sendall(head)
            else:
                s = socket.create_connection(addr, timeout=10)
                s.sendall(HALF_HEAD)
            s.setblocking(False)
            sent_at[s] = time.monotonic()
            selector.register(s, selectors.EVENT_READ)
        opened = time.monotonic() - began
        what = (f"asking for {args.requests} responses each and reading none" if args.stalled
                else f"sending a POST body's first 16 bytes, then a byte every {args.dribble} s"
                if args.slow_body and args.dribble
                else "holding a POST body after its first 16 bytes" if args.slow_body
                else "holding half a request head")
        print(f"{args.connections} connections {what}, opened in {opened:.2f} s")

        stop = threading.Event()
        latencies, failures = [], []
        client = threading.Thread(target=normal_client, args=(addr, stop, latencies, failures))
        client.start()

        closed_after = []
        answered_408 = 0
        timeout = (args.idle_timeout if args.stalled else args.body_timeout if args.slow_body
                   else args.header_timeout)
        deadline = time.monotonic() + timeout * 3 + 30
        next_drip = time.monotonic() + (args.dribble or 0)
        while sent_at and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss_mib(gateway.pid))
            if args.slow_body and args.dribble and time.monotonic() >= next_drip:
                next_drip += args.dribble
                for s in list(sent_at):
                    try:
                        s.send(b" ")
                    except OSError:
                        pass
            if args.stalled:
                # Never read: look at each socket's state (a reset closes it).
                time.sleep(0.1)
                for s in [s for s in sent_at if tcp_state(s) == 7]:
                    closed_after.append(time.monotonic() - sent_at.pop(s))
                    selector.unregister(s)
                    s.close()
                continue
            for key, _ in selector.select(timeout=0.2 if args.dribble else 1):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data:
                    first_bytes.setdefault(s, data[:12])
                    continue
                closed_after.append(time.monotonic() - sent_at.pop(s))
                selector.unregister(s)
                answered_408 += first_bytes.get(s, b"").startswith(b"HTTP/1.1 408")
                s.close()
        stop.set()
        client.join()

        key = ("idle_timeout_seconds" if args.stalled else "body_read_timeout_seconds"
               if args.slow_body else "header_read_timeout_seconds")
        print(f"closed by the gateway: {len(closed_after)} of {args.connections} ({key} {timeout})")
        if closed_after:
            start = ("last request sent" if args.stalled
                     else "first body bytes" if args.slow_body and args.dribble
                     else "last body bytes" if args.slow_body else "half head")
            print("  time from {} to close: min {:.2f} s, median {:.2f} s, max {:.2f} s".format(
                start, min(closed_after), statistics.median(closed_after), max(closed_after)))
        print(f"gateway resident memory at its peak: {peak_rss:.0f} MiB")
        if latencies:
            print("normal client during the attack: {} GET /metadata answered 200, latency p50 {:.1f} ms, "
                  "p99 {:.1f} ms, max {:.1f} ms".format(
                      len(latencies), 1000 * statistics.median(latencies),
                      1000 * percentile(latencies, 0.99), 1000 * max(latencies)))
        if failures:
            print(f"normal client failures: {len(failures)}, first {failures[0]!r}")
        ok = not sent_at and latencies and not failures
        if args.slow_body:
            print(f"answered 408 before the close: {answered_408}; whole bodies the upstream "
                  f"received: {Upstream.whole_bodies}")
            ok = ok and answered_408 == args.connections and Upstream.whole_bodies == 0
        print("ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
        if upstream:
            upstream.shutdown()


if __name__ == "__main__":
    sys.exit(main())
