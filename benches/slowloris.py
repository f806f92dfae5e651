#!/usr/bin/env python3
"""Slowloris against the release gateway: many connections each send half a request head and
hold it; meanwhile a normal client keeps asking `GET /metadata`. Prints how long the server
took to close the held connections (it should be about `header_read_timeout_seconds`) and the
normal client's latency during the attack.

With `--stalled`, each held connection instead asks for many responses at once (pipelined
`GET /metadata`s, about 1 KB each) and never reads them, with a 4 KiB receive buffer: the
gateway's writes find no room, and it should drop the connection (a reset) about
`idle_timeout_seconds` after that. Also prints the gateway's resident memory at its peak.

    cargo build --release -p tower-fhir-gateway
    python3 benches/slowloris.py                        # 2,000 connections, a 5 s timeout
    python3 benches/slowloris.py --connections 5000 --header-timeout 10
    python3 benches/slowloris.py --stalled              # 200 that stop reading, a 5 s timeout

The binary is `$CARGO_TARGET_DIR/release/tower-fhir-gateway` (`target/` without the variable)
unless `--gateway` names another. Each held connection takes a file descriptor here and one in
the gateway: `ulimit -n` must exceed `--connections` by a few dozen.
"""

import argparse
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

HALF_HEAD = b"GET /metadata HTTP/1.1\r\nHost: x\r\n"
METADATA = b"GET /metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
METADATA_KEPT = b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n"


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
    parser.add_argument("--connections", type=int, help="default 2,000 (200 with --stalled)")
    parser.add_argument("--header-timeout", type=int, default=5,
                        help="the gateway's header_read_timeout_seconds")
    parser.add_argument("--stalled", action="store_true",
                        help="connections that ask for responses and never read them")
    parser.add_argument("--idle-timeout", type=int, default=5,
                        help="the gateway's idle_timeout_seconds (with --stalled)")
    parser.add_argument("--requests", type=int, default=3000,
                        help="pipelined requests per stalled connection")
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    parser.add_argument("--gateway", default=os.path.join(target, "release", "tower-fhir-gateway"))
    args = parser.parse_args()
    if args.connections is None:
        args.connections = 200 if args.stalled else 2000

    work = tempfile.mkdtemp(prefix="slowloris-")
    config = os.path.join(work, "gateway.json")
    with open(config, "w") as f:
        json.dump({"listen": "127.0.0.1:0", "state_dir": os.path.join(work, "state"),
                   "header_read_timeout_seconds": args.header_timeout,
                   "idle_timeout_seconds": args.idle_timeout}, f)
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
        began = time.monotonic()
        peak_rss = rss_mib(gateway.pid)
        for _ in range(args.connections):
            if args.stalled:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(10)
                s.connect(addr)
                s.sendall(METADATA_KEPT * args.requests)
            else:
                s = socket.create_connection(addr, timeout=10)
                s.sendall(HALF_HEAD)
            s.setblocking(False)
            sent_at[s] = time.monotonic()
            selector.register(s, selectors.EVENT_READ)
        opened = time.monotonic() - began
        what = (f"asking for {args.requests} responses each and reading none" if args.stalled
                else "holding half a request head")
        print(f"{args.connections} connections {what}, opened in {opened:.2f} s")

        stop = threading.Event()
        latencies, failures = [], []
        client = threading.Thread(target=normal_client, args=(addr, stop, latencies, failures))
        client.start()

        closed_after = []
        timeout = args.idle_timeout if args.stalled else args.header_timeout
        deadline = time.monotonic() + timeout * 3 + 30
        while sent_at and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss_mib(gateway.pid))
            if args.stalled:
                # Never read: look at each socket's state (a reset closes it).
                time.sleep(0.1)
                for s in [s for s in sent_at if tcp_state(s) == 7]:
                    closed_after.append(time.monotonic() - sent_at.pop(s))
                    selector.unregister(s)
                    s.close()
                continue
            for key, _ in selector.select(timeout=1):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data:
                    continue
                closed_after.append(time.monotonic() - sent_at.pop(s))
                selector.unregister(s)
                s.close()
        stop.set()
        client.join()

        key = "idle_timeout_seconds" if args.stalled else "header_read_timeout_seconds"
        print(f"closed by the gateway: {len(closed_after)} of {args.connections} ({key} {timeout})")
        if closed_after:
            start = "last request sent" if args.stalled else "half head"
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
        print("ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
