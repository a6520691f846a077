"""The dom0 footprint snapshot: parsing its sections and naming what leaked."""

from __future__ import annotations

import pytest

from pvlab import footprint

pytestmark = pytest.mark.unit

BEFORE = """@domains
@nat_rules
-A PREROUTING -j pvlab-imds
@vifs
@loop_devices
@xenstore_backends
console/0
@imds_registrations
@dhcp_hosts
@guest_dirs
@gdbsx
@imds_memory_kib
  20480
"""


def test_a_snapshot_parses_into_its_sections():
    snap = footprint.parse(BEFORE)

    assert snap.nat_rules == {"-A PREROUTING -j pvlab-imds"}
    assert snap.xenstore_backends == {"console/0"}
    assert snap.vifs == frozenset()
    assert snap.imds_memory_kib == 20480


def test_resources_added_since_the_first_snapshot_are_named_as_leaks():
    after = footprint.parse(
        BEFORE.replace("@vifs\n", "@vifs\nvif3.0\n").replace(
            "@imds_registrations\n", "@imds_registrations\ncycle-1.json\n"
        )
    )

    assert after.leaks_since(footprint.parse(BEFORE)) == [
        "vifs: vif3.0",
        "imds_registrations: cycle-1.json",
    ]


def test_a_removed_resource_is_not_a_leak():
    before = footprint.parse(BEFORE.replace("@gdbsx\n", "@gdbsx\n812 gdbsx -a 3\n"))

    assert footprint.parse(BEFORE).leaks_since(before) == []


def test_output_missing_a_section_is_refused():
    with pytest.raises(ValueError, match="vifs"):
        footprint.parse(BEFORE.replace("@vifs\n", ""))
