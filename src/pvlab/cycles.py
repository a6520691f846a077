"""Guests created and destroyed in a loop, to show a guest's life leaves nothing behind.

A cycle creates a guest paused (the whole `invoke boot --paused` path: copy,
xl config, IMDS and DHCP registrations, `xl create -p`, vif hotplug and DNAT),
unpauses it and destroys it. The leak test and bench/cycles.py share this.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from pvlab import domain, footprint
from pvlab.settings import Settings
from pvlab.vm import Dom0

CYCLE_MEMORY_MIB = 128


@dataclass
class CycleRun:
    before: footprint.Footprint
    after: footprint.Footprint | None = None
    # Taken while the first cycle's guest ran: proves the snapshot sees guests.
    during: footprint.Footprint | None = None
    seconds: list[float] = field(default_factory=list)

    @property
    def leaks(self) -> list[str]:
        return self.after.leaks_since(self.before) if self.after else []


def one_cycle(
    settings: Settings,
    guests: domain.Guests,
    image: Path,
    name: str,
    probe: bool = False,
) -> footprint.Footprint | None:
    """One guest life; returns dom0's footprint while the guest runs when asked."""
    from pvlab.tasks import boot_image

    boot_image(
        settings, image, name=name, env=[f"CYCLE={name}"],
        memory=CYCLE_MEMORY_MIB, paused=True,
    )
    try:
        guests.dom0.run(f"xl unpause {shlex.quote(name)}")
        return footprint.take(guests.dom0) if probe else None
    finally:
        guests.destroy(name)


def run(
    settings: Settings,
    image: Path,
    count: int,
    *,
    prefix: str = "cycle",
    full_boot: bool = True,
    progress=print,
) -> CycleRun:
    """A full boot and count cycles, with footprints taken before and after."""
    dom0 = Dom0(settings)
    guests = domain.Guests(dom0, settings)
    result = CycleRun(before=footprint.take(dom0))
    if full_boot:
        # One boot to the end (console, user-data, poweroff), then the cycles.
        from pvlab.tasks import boot_image

        boot_image(settings, image, name=f"{prefix}-boot", env=["CYCLE=boot"],
                   memory=CYCLE_MEMORY_MIB)
    for index in range(count):
        started = time.monotonic()
        seen = one_cycle(
            settings, guests, image, f"{prefix}-{index}", probe=index == 0
        )
        result.during = result.during or seen
        result.seconds.append(time.monotonic() - started)
        progress(f"cycle {index + 1}/{count}: {result.seconds[-1]:.1f} s")
    result.after = footprint.take(dom0)
    return result
