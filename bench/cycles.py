"""Leaks over many guest lives: N create/unpause/destroy cycles and one full boot.

Prints the time per cycle and dom0's per-guest resources (NAT rules, vifs, loop
devices, xenstore backends, IMDS and DHCP registrations, gdbsx processes) and the
IMDS service's memory before and after. Usage: python bench/cycles.py [N] (default
100). Needs a provisioned dom0 (`invoke provision`) with no other guests starting
or stopping meanwhile.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from pvlab import cycles, sample
from pvlab import settings as settings_mod


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    s = settings_mod.load()
    image = sample.build_sample_image(Path(s.cache_dir) / "images")
    run = cycles.run(s, image, count, prefix="bench-cycle")

    seconds = sorted(run.seconds)
    print(f"cycles:            {count}")
    print(f"seconds per cycle: median {statistics.median(seconds):.1f}, "
          f"max {seconds[-1]:.1f}, total {sum(seconds):.0f}")
    before, after = run.before.counts(), run.after.counts()
    for key in before:
        print(f"{key:22} before {before[key]:6}  after {after[key]:6}")
    print(f"leaked:            {len(run.leaks)}")
    for line in run.leaks:
        print(f"  {line}")
    if run.leaks:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
