"""A real PV boot: the sample volume through PV-GRUB 2, user-data through the DNAT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pvlab import sample
from pvlab.settings import PROJECT_ROOT

from helpers import invoke


@pytest.fixture(scope="session")
def sample_image(pvlab_settings):
    return sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")




def printed_user_data(console: str) -> str:
    match = re.search(
        re.escape(sample.BEGIN_MARKER) + r"\n(.*?)\n?" + re.escape(sample.END_MARKER),
        console,
        re.S,
    )
    assert match, f"no user-data markers in the console:\n{console[-3000:]}"
    return match.group(1)


def test_guest_prints_the_user_data_registered_for_it(host, sample_image, tmp_path):
    user_data = {"GREETING": "hello", "PVLAB_TEST": "e2e"}
    path = tmp_path / "user-data.json"
    path.write_text(json.dumps(user_data))

    result = invoke(
        "boot", "--image", str(sample_image), "--name", "pvlab-e2e",
        "--user-data", str(path), "--memory", "256", "--instance-type", "t1.micro",
    )

    console = result.stdout
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "reading (xen/sda1)/boot/grub/menu.lst" in console
    assert "Booting `pvlab sample'" in console
    assert "pvlab-sample: init started" in console
    assert json.loads(printed_user_data(console)) == user_data


def test_guest_used_an_imdsv2_token_and_the_request_log_shows_it(host):
    result = invoke("metadata", "--name", "pvlab-e2e", "--log")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        "PUT" in line and " 200 " in line and "/latest/api/token" in line
        for line in lines
    )
    assert any(
        line.split()[1] == "v2" and "GET" in line and " 200 " in line and line.endswith(
            "/latest/user-data")
        for line in lines
    ), result.stdout


def test_nothing_of_the_guest_remains_after_it_stops(host):
    assert "pvlab-imds" not in host.check_output("iptables -w -t nat -S PREROUTING")
    assert host.run("xl domid pvlab-e2e").rc != 0
    assert not host.file("/var/lib/pvlab/guests/pvlab-e2e").exists
    assert not host.file("/var/lib/pvlab/dhcp-hosts/pvlab-e2e").exists


def test_partitioned_volume_boots_with_the_hd00_pv_grub(host, pvlab_settings, tmp_path):
    image = sample.build_sample_image(
        Path(pvlab_settings.cache_dir) / "images", layout="hd00"
    )

    result = invoke(
        "boot", "--image", str(image), "--name", "pvlab-e2e-hd00", "--env",
        "LAYOUT=hd00", "--memory", "256", "--instance-type", "t1.micro",
    )

    console = result.stdout
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "PV-GRUB 2 (hd00)" in console
    assert json.loads(printed_user_data(console)) == {"LAYOUT": "hd00"}


def test_hand_written_recipe_config_boots_with_pvlab_pv_grub(host, sample_image):
    config = PROJECT_ROOT / "tests" / "fixtures" / "aws-test.conf"

    result = invoke(
        "boot", "--config", str(config), "--image", str(sample_image),
        "--name", "pvlab-e2e-cfg", "--memory", "256",
    )

    console = result.stdout
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "replaced by pvlab's PV-GRUB" in console
    assert "mac 00:16:3e:58:88:57" in console
    assert json.loads(printed_user_data(console)) == {}


def test_hd0_pv_grub_for_a_partitioned_volume_is_refused_before_anything_exists(
    host, pvlab_settings
):
    image = sample.build_sample_image(
        Path(pvlab_settings.cache_dir) / "images", layout="hd00"
    )

    result = invoke(
        "boot", "--image", str(image), "--name", "pvlab-e2e-mismatch",
        "--pvgrub-variant", "hd0", "--memory", "256",
    )

    assert result.returncode == 1
    assert "would not boot under PV-GRUB hd0" in result.stderr
    assert host.run("xl domid pvlab-e2e-mismatch").rc != 0
    assert not host.file("/var/lib/pvlab/guests/pvlab-e2e-mismatch").exists
