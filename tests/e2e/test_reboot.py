"""dom0 rebooted with `vagrant reload` under a running task, and no re-provisioning:
the task ends with one sentence, and Xen, the bridge, DHCP, the IMDS and the
hotplug hook all come back, so a guest boots and reads its user-data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pvlab import sample
from pvlab.settings import PROJECT_ROOT

from helpers import held_sample_volume, invoke

# The conftest runs these after every other test: they reboot dom0.
pytestmark = pytest.mark.reboots_dom0

GUEST = "reboot-held"


@pytest.fixture(scope="module")
def interrupted_boot(dom0_vm, pvlab_settings, tmp_path_factory):
    """`invoke boot` of a guest that stays up, with dom0 reloaded under it."""
    volume, _ = held_sample_volume(pvlab_settings, tmp_path_factory.mktemp("reboot"))
    invoke("destroy", "--name", GUEST)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "invoke", "boot", "--image", str(volume),
            "--name", GUEST, "--memory", "256", "--instance-type", "t1.micro",
        ],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )
    stdout: list[str] = []
    held = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stdout.append(line)
            if "holding (" in line:
                held.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert held.wait(600), "".join(stdout)[-3000:]
        reload_started = time.monotonic()
        dom0_vm.reload()
        # The task must have ended by itself while the VM went down.
        code = proc.wait(timeout=60)
        ended_after = time.monotonic() - reload_started
        reader.join(10)
        yield {
            "code": code,
            "stdout": "".join(stdout),
            "stderr": proc.stderr.read() if proc.stderr else "",
            "ended_within_reload_s": ended_after,
        }
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_boot_streaming_when_dom0_goes_down_ends_with_one_sentence(interrupted_boot):
    assert interrupted_boot["code"] == 1, interrupted_boot
    errors = [
        line for line in interrupted_boot["stderr"].splitlines()
        if line.startswith("pvlab: error:")
    ]
    assert len(errors) == 1, interrupted_boot["stderr"]
    assert f"lost dom0 while streaming {GUEST}'s console" in errors[0]
    assert "Traceback" not in interrupted_boot["stderr"]


def test_xen_runs_after_the_reboot(interrupted_boot, host):
    info = host.check_output("xl info")
    assert "xen_major" in info
    assert host.check_output("cat /sys/hypervisor/type").strip() == "xen"


def test_xenbr0_has_its_address_after_the_reboot(
    interrupted_boot, host, pvlab_settings
):
    assert pvlab_settings.bridge_address in host.interface("xenbr0").addresses


def test_dhcp_and_the_imds_serve_after_the_reboot(
    interrupted_boot, host, pvlab_settings
):
    assert host.service("dnsmasq").is_running
    assert host.service("pvlab-imds").is_running
    deadline = time.monotonic() + 60
    listening = ""
    while time.monotonic() < deadline:
        listening = host.check_output("ss -ltn")
        if f"{pvlab_settings.bridge_address}:{pvlab_settings.imds_port} " in listening:
            break
        time.sleep(2)
    assert f"{pvlab_settings.bridge_address}:{pvlab_settings.imds_port} " in listening


def test_the_hotplug_hook_is_in_place_after_the_reboot(interrupted_boot, host):
    hook = host.file("/etc/xen/scripts/metadata-fake")
    assert hook.exists and hook.mode & 0o111


def test_a_guest_boots_and_reads_its_user_data_after_the_reboot(
    interrupted_boot, pvlab_settings
):
    image = sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")

    result = invoke(
        "boot", "--image", str(image), "--name", "reboot-after", "--env",
        "AFTER=reload", "--memory", "256", "--instance-type", "t1.micro",
    )

    console = result.stdout
    assert result.returncode == 0, result.stderr + console[-3000:]
    printed = console.split(sample.BEGIN_MARKER)[1].split(sample.END_MARKER)[0]
    assert json.loads(printed) == {"AFTER": "reload"}


def test_the_testinfra_role_checks_pass_after_the_reboot(interrupted_boot):
    # Every role's checks, except those that apply a role themselves.
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q",
            "-m", "integration and not applies_roles", "tests/integration",
        ],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:]
