"""Test tiers: unit (no VM), integration (testinfra on dom0), e2e (boots guests)."""

from __future__ import annotations

import pytest

from pvlab import settings as settings_mod


def pytest_collection_modifyitems(config, items):
    # A test's tier follows from its folder unless it names one itself, so no
    # test can miss its marker.
    tiers = ("unit", "integration", "e2e")
    for item in items:
        if any(item.get_closest_marker(tier) for tier in tiers):
            continue
        for tier in tiers:
            if f"/tests/{tier}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, tier))
    # Tests that reboot dom0 go last, so nothing else runs across a reboot.
    items.sort(key=lambda item: item.get_closest_marker("reboots_dom0") is not None)


@pytest.fixture(scope="session")
def pvlab_settings():
    return settings_mod.load()


@pytest.fixture(scope="session")
def dom0_vm(pvlab_settings):
    from pvlab.vm import Dom0

    dom0 = Dom0(pvlab_settings)
    if dom0.status() != "running":
        pytest.fail("the dom0 VM is not running; run `invoke provision` first")
    return dom0


@pytest.fixture(scope="session")
def host(dom0_vm):
    """testinfra's view of the provisioned dom0, through Vagrant's SSH settings."""
    import testinfra

    return testinfra.get_host(
        "ssh://dom0", ssh_config=str(dom0_vm.ssh_config()), sudo=True
    )
