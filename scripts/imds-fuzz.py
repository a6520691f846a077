#!/usr/bin/env python3
"""A bounded HTTP fuzz of pvlab's IMDS, run inside dom0 against its bridge address.

Sends malformed request lines, oversized headers, slow (trickling) clients and a
burst of idle connections, and between rounds checks that a good request is still
answered. Prints one JSON object: the rounds, the good answers, and the service's
resident memory before and after. Standard library only, so it runs in dom0 as is.
It refuses any address outside loopback and the 198.18.0.0/15 test network.

Usage: python3 imds-fuzz.py ADDRESS PORT SERVICE_PID [--rounds N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time

ALLOWED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("198.18.0.0/15"))
MALFORMED = [
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /latest/meta-data/\r\n\r\n",
    b"GET /latest/meta-data/ HTTP/9.9\r\n\r\n",
    b"BREW /latest/meta-data/ HTTP/1.1\r\n\r\n",
    b"GET " + b"/a" * 5000 + b" HTTP/1.1\r\n\r\n",
    b"GET /%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /latest/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x01\x02\xff\xfe garbage\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Many: y\r\n" * 500 + b"\r\n",
    b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n",
]
IDLE_CONNECTIONS = 300
SLOW_CLIENTS = 5
SLOW_SECONDS = 8


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def exchange(address: str, port: int, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first on a bad request: that is fine
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def good_request_answered(address: str, port: int, patience: float = 5) -> bool:
    """A good request gets an answer other than 5xx within a few seconds (the
    service may still be reaping connections the fuzz just closed)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            reply = exchange(address, port, b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n")
        except OSError:
            reply = b""
        status = reply.split(b"\r\n")[0]
        if status.startswith(b"HTTP/1.") and b" 5" not in status:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def slow_clients(address: str, port: int) -> None:
    socks = [socket.create_connection((address, port), timeout=5)
             for _ in range(SLOW_CLIENTS)]
    deadline = time.monotonic() + SLOW_SECONDS
    try:
        while time.monotonic() < deadline:
            for sock in socks:
                try:
                    sock.send(b"G")
                except OSError:
                    pass  # cut off by the server's request timeout: expected
            time.sleep(0.5)
    finally:
        for sock in socks:
            sock.close()


def idle_burst(address: str, port: int) -> int:
    socks = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            try:
                socks.append(socket.create_connection((address, port), timeout=5))
            except OSError:
                break
        return len(socks)
    finally:
        for sock in socks:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("pid", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not any(ipaddress.ip_address(args.address) in net for net in ALLOWED):
        parser.error(f"{args.address} is outside loopback and 198.18.0.0/15")
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")

    result = {"rounds": args.rounds, "rss_kib_before": rss_kib(args.pid),
              "good_answered": 0, "good_asked": 0, "idle_opened": []}
    for _ in range(args.rounds):
        for payload in MALFORMED:
            exchange(args.address, args.port, payload)
            result["good_asked"] += 1
            result["good_answered"] += good_request_answered(args.address, args.port)
        slow_clients(args.address, args.port)
        result["idle_opened"].append(idle_burst(args.address, args.port))
        result["good_asked"] += 1
        result["good_answered"] += good_request_answered(args.address, args.port)
    time.sleep(1)
    result["rss_kib_after"] = rss_kib(args.pid)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
