"""Requests per second and p50/p99 latency of the IMDS emulator on loopback, next to
Python's http.server serving the same bytes from files and moto's server mode.

Every request opens a new connection, as a guest's boot-time fetch does. Run from the
repository with the project venv: `python bench/imds.py [--requests N]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMDS = ROOT / "src" / "pvlab" / "imds.py"
ROLE = "default-role"  # the one role moto's server mode answers for
USER_DATA = json.dumps({f"KEY_{n}": "v" * 24 for n in range(16)}).encode()
PATHS = {
    "user-data": "/latest/user-data",
    "meta-data leaf": "/latest/meta-data/instance-id",
    "role credentials": f"/latest/meta-data/iam/security-credentials/{ROLE}",
}
GOAL_P99_MS = 5.0


@dataclass
class Result:
    server: str
    what: str
    rps: float
    p50_ms: float
    p99_ms: float
    concurrent_rps: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def request_for(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )


def wait_ready(port: int, path: str, proc: subprocess.Popen, name: str) -> bytes:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {name} exited with status {proc.returncode}")
        try:
            status, body = fetch(port, request_for(path))
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {name} did not answer {path} within 30 s")


def measure(server: str, what: str, port: int, path: str, count: int) -> Result:
    request = request_for(path)
    for _ in range(min(200, count)):  # warm-up
        fetch(port, request)

    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        status, _ = fetch(port, request)
        latencies.append(time.perf_counter() - t0)
        if status != 200:
            raise SystemExit(f"bench: {server} answered {status} for {path}")
    elapsed = time.perf_counter() - started

    threads, per_thread = 4, max(1, count // 4)
    errors: list[int] = []

    def client() -> None:
        for _ in range(per_thread):
            status, _ = fetch(port, request)
            if status != 200:
                errors.append(status)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    concurrent_started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    concurrent_elapsed = time.perf_counter() - concurrent_started
    if errors:
        raise SystemExit(f"bench: {server} answered {errors[0]} under load")

    cuts = statistics.quantiles(latencies, n=100)
    return Result(
        server,
        what,
        rps=count / elapsed,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
        concurrent_rps=threads * per_thread / concurrent_elapsed,
    )


class Servers:
    """The three servers under test, started here and stopped by PID."""

    def __init__(self, workdir: Path, moto_python: str) -> None:
        self.workdir = workdir
        self.moto_python = moto_python
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - child owns it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def start_all(self) -> None:
        state, config = self.workdir / "state", self.workdir / "imds.json"
        config.write_text(json.dumps({"iam_role": ROLE}))
        user_data = self.workdir / "user-data"
        user_data.write_bytes(USER_DATA)
        subprocess.run(
            [sys.executable, str(IMDS), "register", "--state-dir", str(state),
             "--config", str(config), "--name", "bench", "--ip", "127.0.0.1",
             "--mac", "00:16:3e:00:00:01", "--user-data-file", str(user_data)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        port = self.ports["imds"] = free_port()
        proc = self.start("imds", [
            sys.executable, str(IMDS), "serve", "--address", "127.0.0.1",
            "--port", str(port), "--state-dir", str(state), "--config", str(config),
        ])  # fmt: skip

        # The static server serves exactly what the emulator answers.
        docroot = self.workdir / "docroot"
        for path in PATHS.values():
            body = wait_ready(port, path, proc, "imds")
            target = docroot / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        port = self.ports["http.server"] = free_port()
        proc = self.start("static", [
            sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(docroot),
        ])  # fmt: skip
        wait_ready(port, PATHS["user-data"], proc, "http.server")

        port = self.ports["moto"] = free_port()
        proc = self.start("moto", [
            self.moto_python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port),
        ])  # fmt: skip
        wait_ready(port, PATHS["role credentials"], proc, "moto")


def moto_interpreter(requested: str | None) -> str:
    candidates = [requested] if requested else [sys.executable]
    for python in candidates:
        probe = subprocess.run(
            [python, "-c", "import moto.server"], capture_output=True, timeout=60
        )
        if probe.returncode == 0:
            return python
    raise SystemExit(
        "bench: moto is not importable; run `pip install 'moto[server]'` in the venv "
        "or pass --moto-python PATH"
    )


def report(results: list[Result]) -> None:
    print(f"{'server':<12} {'path':<17} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'req/s x4':>9}")  # fmt: skip
    for r in results:
        print(f"{r.server:<12} {r.what:<17} {r.rps:>8.0f} {r.p50_ms:>7.2f} "
              f"{r.p99_ms:>7.2f} {r.concurrent_rps:>9.0f}")  # fmt: skip

    by_key = {(r.server, r.what): r for r in results}
    print("\nratios (imds / peer; req/s above 1 and p99 below 1 favour imds)")
    for what in PATHS:
        mine = by_key[("imds", what)]
        for peer in ("http.server", "moto"):
            other = by_key.get((peer, what))
            if other:
                print(
                    f"  {what:<17} vs {peer:<11} req/s {mine.rps / other.rps:5.2f}  "
                    f"p99 {mine.p99_ms / other.p99_ms:5.2f}  "
                    f"req/s x4 {mine.concurrent_rps / other.concurrent_rps:5.2f}"
                )

    ours = [r for r in results if r.server == "imds"]
    worst = max(r.p99_ms for r in ours)
    slower = [r.what for r in ours
              if r.rps < by_key[("http.server", r.what)].rps]  # fmt: skip
    print(f"\ngoal p99 < {GOAL_P99_MS} ms: {'met' if worst < GOAL_P99_MS else 'MISSED'}"
          f" (worst {worst:.2f} ms)")  # fmt: skip
    print("goal not slower than http.server: "
          + ("met" if not slower else f"MISSED for {', '.join(slower)}"))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="sequential requests per server and path (default 2000)",
    )
    parser.add_argument("--moto-python", help="interpreter with moto[server]")
    args = parser.parse_args(argv)
    count = max(100, min(args.requests, 50000))

    workdir = Path(tempfile.mkdtemp(prefix="pvlab-bench-imds-"))
    servers = Servers(workdir, moto_interpreter(args.moto_python))
    results = []
    try:
        servers.start_all()
        for what, path in PATHS.items():
            for name in ("imds", "http.server", "moto"):
                if name == "moto" and what != "role credentials":
                    continue
                results.append(measure(name, what, servers.ports[name], path, count))
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{count} sequential requests per row, each on a new loopback connection; "
          f"'x4' is {count // 4 * 4} more from 4 client threads\n")  # fmt: skip
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
