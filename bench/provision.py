"""Warm re-provisioning against cold provisioning, with the base box cached.

Destroys this checkout's dom0 VM, provisions it from the cached box (cold: `vagrant
up` plus every role), then provisions again with nothing to change (warm). Prints
both times, their ratio (goal: at most 0.25) and the warm run's changed count
(goal: 0). Takes about 25 minutes under emulation; leaves a provisioned VM.
"""

from __future__ import annotations

import time

from pvlab import provision
from pvlab import settings as settings_mod
from pvlab.vm import Dom0


def timed(func):
    started = time.monotonic()
    result = func()
    return time.monotonic() - started, result


def main() -> None:
    s = settings_mod.load()
    provision.ensure_box(s)
    dom0 = Dom0(s)
    if dom0.status() != "not_created":
        dom0.destroy()
    cold, _ = timed(lambda: provision.provision(s))
    warm, recap = timed(lambda: provision.provision(s))
    print(f"cold provision (box cached): {cold:7.0f} s")
    print(f"warm re-provision:           {warm:7.0f} s, {recap.changed} changed")
    print(f"ratio warm / cold:           {warm / cold:7.2f} (goal <= 0.25, 0 changed)")


if __name__ == "__main__":
    main()
