"""The Vagrant VM addressed as an existing Xen host through an inventory file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pvlab import sample

from helpers import invoke


@pytest.fixture(scope="module")
def inventory_file(dom0_vm, tmp_path_factory):
    path = tmp_path_factory.mktemp("inventory") / "lab.ini"
    shutil.copyfile(dom0_vm.ansible_inventory(), path)
    return path


def test_provision_with_an_inventory_applies_the_same_roles_with_nothing_to_change(
    inventory_file,
):
    result = invoke("provision", "--inventory", str(inventory_file), timeout=1800)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "applying the Ansible roles to dom0 from" in result.stdout
    assert "1 Xen host(s) provisioned" in result.stdout
    assert " 0 changed" in result.stdout
    assert "starting the dom0 VM" not in result.stdout


def test_boot_on_an_inventory_host_reads_its_user_data(inventory_file, pvlab_settings):
    image = sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")

    result = invoke(
        "boot", "--image", str(image), "--name", "inv-boot", "--host", "dom0",
        "--inventory", str(inventory_file), "--env", "VIA=inventory",
        "--memory", "256", "--instance-type", "t1.micro",
    )

    console = result.stdout
    assert result.returncode == 0, result.stderr + console[-3000:]
    printed = console.split(sample.BEGIN_MARKER)[1].split(sample.END_MARKER)[0]
    assert json.loads(printed) == {"VIA": "inventory"}
