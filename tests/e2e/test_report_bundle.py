"""`invoke report` against the real dom0: a sample guest created paused, then reported
on; and a guest that never existed, which still gives a report."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pvlab import sample

from helpers import invoke

GUEST = "pvlab-e2e-report"


@pytest.fixture(scope="module")
def paused_guest(host, pvlab_settings):
    image = sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")
    booted = invoke(
        "boot", "--image", str(image), "--name", GUEST, "--paused",
        "--memory", "256", "--instance-type", "t1.micro",
    )
    assert booted.returncode == 0, booted.stdout + booted.stderr
    yield GUEST
    invoke("destroy", "--name", GUEST, timeout=120)


def report_on(name: str, out: Path) -> dict[str, bytes]:
    result = invoke("report", "--name", name, "--output", str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report on {name} in {out}" in result.stdout
    [tarball] = out.glob(f"pvlab-report-{name}-*.tar.gz")
    with tarfile.open(tarball) as tar:
        return {
            m.name.split("/", 1)[1]: tar.extractfile(m).read()
            for m in tar.getmembers()
        }


def dom0_state(host) -> tuple[str, str]:
    return (
        host.check_output("xl list | awk '{print $1, $2}'"),
        host.check_output("iptables-save -t nat | grep -v '^[#:]'"),
    )


def test_report_on_a_paused_guest_holds_its_logs_and_config(
    host, paused_guest, tmp_path
):
    before = dom0_state(host)

    files = report_on(GUEST, tmp_path)

    assert {
        "README.txt", "xen/xl-info.txt", "xen/xl-list.txt", "xen/xl-dmesg.txt",
        f"xen/xl-list-l-{GUEST}.json", f"logs/xl-{GUEST}.log",
        "logs/xen-hotplug.log", "logs/hotplug-syslog.txt", "imds/journal.txt",
        f"guest/files/{GUEST}.cfg",
        "network/iptables-nat.txt", "network/ip-addr.txt", "pvlab/settings.txt",
        "pvlab/version.txt",
    } <= set(files), sorted(files)
    assert GUEST.encode() in files[f"logs/xl-{GUEST}.log"]
    assert GUEST.encode() in files["xen/xl-list.txt"]
    [details] = json.loads(files[f"xen/xl-list-l-{GUEST}.json"])
    assert details["config"]["c_info"]["name"] == GUEST
    assert f'name = "{GUEST}"'.encode() in files[f"guest/files/{GUEST}.cfg"]
    assert b"xenbr0" in files["network/ip-addr.txt"]
    # Its vif's hotplug run, with the DNAT rule metadata-fake added for it.
    assert b"/etc/xen/scripts/metadata-fake" in files["logs/hotplug-syslog.txt"]
    assert b"pvlab-imds vif" in files["network/iptables-nat.txt"]
    assert "guest/files/boot-vol.img" not in files
    readme = files["README.txt"].decode()
    assert "guest/files/boot-vol.img  (not in the tarball)" in readme
    # Created paused, the guest has printed nothing: no console log on the host.
    assert "guest/console.log  (not in the tarball)" in readme
    assert dom0_state(host) == before


def test_report_on_a_guest_that_never_existed_notes_what_is_missing(host, tmp_path):
    name = "pvlab-e2e-never-booted"

    files = report_on(name, tmp_path)

    readme = files["README.txt"].decode()
    assert f"note: no domain {name} exists now" in readme
    assert f"note: no xl log of {name}" in readme
    assert f"note: no files of {name} in dom0" in readme
    assert {"xen/xl-info.txt", "xen/xl-dmesg.txt", "network/iptables-nat.txt"} <= set(
        files
    )
    assert f"xen/xl-list-l-{name}.json" not in files
