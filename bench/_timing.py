"""Shared by the benchmarks: time a command until it prints a given line."""

from __future__ import annotations

import subprocess
import time


def time_until(argv: list[str], needle: str, timeout: float = 600) -> float:
    """Seconds from starting argv until a line containing needle is printed.

    The command is then left to finish (bounded by timeout).
    """
    started = time.monotonic()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if needle.encode() in raw:
                elapsed = time.monotonic() - started
                proc.wait(timeout=timeout)
                return elapsed
            if time.monotonic() - started > timeout:
                break
        proc.kill()
    raise SystemExit(f"{needle!r} not printed within {timeout:.0f} s by {argv[:4]}")
