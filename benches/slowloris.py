#!/usr/bin/env python3
"""Slowloris against the release gateway: many connections each send half a request head and
hold it; meanwhile a normal client keeps asking `GET /metadata`. Prints how long the server
took to close the held connections (it should be about `header_read_timeout_seconds`) and the
normal client's latency during the attack.

    cargo build --release -p tower-fhir-gateway
    python3 benches/slowloris.py                        # 2,000 connections, a 5 s timeout
    python3 benches/slowloris.py --connections 5000 --header-timeout 10

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
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--header-timeout", type=int, default=5,
                        help="the gateway's header_read_timeout_seconds")
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    parser.add_argument("--gateway", default=os.path.join(target, "release", "tower-fhir-gateway"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="slowloris-")
    config = os.path.join(work, "gateway.json")
    with open(config, "w") as f:
        json.dump({"listen": "127.0.0.1:0", "state_dir": os.path.join(work, "state"),
                   "header_read_timeout_seconds": args.header_timeout}, f)
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
        for _ in range(args.connections):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(HALF_HEAD)
            s.setblocking(False)
            sent_at[s] = time.monotonic()
            selector.register(s, selectors.EVENT_READ)
        opened = time.monotonic() - began
        print(f"{args.connections} connections holding half a request head, opened in {opened:.2f} s")

        stop = threading.Event()
        latencies, failures = [], []
        client = threading.Thread(target=normal_client, args=(addr, stop, latencies, failures))
        client.start()

        closed_after = []
        deadline = time.monotonic() + args.header_timeout * 3 + 30
        while sent_at and time.monotonic() < deadline:
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

        print(f"closed by the gateway: {len(closed_after)} of {args.connections} "
              f"(header_read_timeout_seconds {args.header_timeout})")
        if closed_after:
            print("  time from half head to close: min {:.2f} s, median {:.2f} s, max {:.2f} s".format(
                min(closed_after), statistics.median(closed_after), max(closed_after)))
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
