"""No leaks: guests created and destroyed in a loop leave dom0 as they found it."""

from __future__ import annotations

import os
from pathlib import Path

from pvlab import cycles, sample

# CI runs 10; bench/cycles.py runs as many as asked (100 by hand).
COUNT = int(os.environ.get("PVLAB_TEST_CYCLES", "10"))


def test_cycles_leave_no_rule_vif_loop_xenstore_entry_or_registration(
    host, pvlab_settings
):
    image = sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")

    run = cycles.run(pvlab_settings, image, COUNT, prefix="e2e-cycle")

    assert len(run.seconds) == COUNT
    # The snapshot does see a guest's resources while it lives...
    seen = {line.split(":")[0] for line in run.during.leaks_since(run.before)}
    assert seen >= {
        "domains", "nat_rules", "vifs", "xenstore_backends", "imds_registrations",
        "dhcp_hosts", "guest_dirs",
    }, seen
    # ...and none of them after the guests are gone.
    assert run.leaks == [], "\n".join(run.leaks)
    assert not run.after.domains & {f"e2e-cycle-{i}" for i in range(COUNT)}
