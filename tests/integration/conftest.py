"""testinfra against the provisioned dom0 VM, reached through Vagrant's SSH settings."""

from __future__ import annotations

import pytest
import testinfra

from pvlab import settings as settings_mod
from pvlab.vm import Dom0


@pytest.fixture(scope="session")
def pvlab_settings():
    return settings_mod.load()


@pytest.fixture(scope="session")
def dom0_vm(pvlab_settings):
    dom0 = Dom0(pvlab_settings)
    if dom0.status() != "running":
        pytest.fail("the dom0 VM is not running; run `invoke provision` first")
    return dom0


@pytest.fixture(scope="session")
def host(dom0_vm):
    return testinfra.get_host(
        "ssh://dom0", ssh_config=str(dom0_vm.ssh_config()), sudo=True
    )
