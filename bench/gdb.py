"""What `invoke gdb --wait-for-kernel` costs: time to first stop at the kernel entry.

Boots the repository's PV test kernel twice in the same dom0: once with
`invoke boot --debug` + `invoke gdb --batch` (timed until gdbsx holds the guest at
the kernel entry), once plainly (timed until the kernel's first console line).
Prints both and their ratio (goal: at most 1.5). Needs a provisioned dom0.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import time_until

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pvkernel"
sys.path.insert(0, str(FIXTURE))

import build  # noqa: E402  (the fixture's builder, not a package)


def invoke(*args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", *args]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pvlab-bench-gdb-"))
    volume = build.build_pv_test_volume(work)
    program = work / "kernel" / "pvtest.elf"

    started = time.monotonic()
    subprocess.run(
        invoke("boot", "--debug", "--image", str(volume), "--name", "bench-gdb",
               "--memory", "256"),
        check=True, stdout=subprocess.DEVNULL,
    )
    boot_seconds = time.monotonic() - started
    gdb_seconds = time_until(
        invoke("gdb", "--name", "bench-gdb", "--program", str(program), "--batch",
               "--ex", "info registers rip"),
        "gdbsx attached to",
    )
    subprocess.run(invoke("destroy", "--name", "bench-gdb"), check=False,
                   stdout=subprocess.DEVNULL)

    plain_seconds = time_until(
        invoke("boot", "--image", str(volume), "--name", "bench-plain",
               "--memory", "256"),
        "pvtest:",
    )

    debug_seconds = boot_seconds + gdb_seconds
    print(f"boot --debug + gdb to the stop at the kernel entry: {debug_seconds:6.1f} s")
    print(f"plain boot to the kernel's first console line:      {plain_seconds:6.1f} s")
    print(f"ratio:                                               "
          f"{debug_seconds / plain_seconds:6.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
