"""Three guests booted at once: each its own address, DNAT and user-data, and one
destroyed leaves the others' metadata working."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from pvlab import domain, sample
from pvlab.settings import PROJECT_ROOT

from helpers import held_sample_volume, invoke

GUESTS = {
    "conc-a": "00:16:3e:5c:00:0a",
    "conc-b": "00:16:3e:5c:00:0b",
    "conc-c": "00:16:3e:5c:00:0c",
}
BOOT_TIMEOUT = 900


class Boot:
    """One `invoke boot --keep` in the background, its output collected."""

    def __init__(self, name: str, mac: str, volume) -> None:
        self.name = name
        self.lines: list[str] = []
        self.user_data_seen = threading.Event()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "invoke", "boot", "--image", str(volume),
                "--name", name, "--mac", mac, "--env", f"WHO={name}", "--keep",
                "--memory", "256", "--instance-type", "t1.micro",
            ],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            # As from a terminal: a run started in the background by a shell
            # without job control inherits SIGINT ignored, and Ctrl-C would
            # then not reach the boot at all.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "holding (" in line:
                self.user_data_seen.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def interrupt(self) -> int:
        """Ctrl-C, as a user would: with --keep the guest runs on."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def three_guests(host, pvlab_settings, tmp_path_factory):
    volume, _ = held_sample_volume(pvlab_settings, tmp_path_factory.mktemp("conc"))
    for name in GUESTS:
        invoke("destroy", "--name", name)
    boots = [Boot(name, mac, volume) for name, mac in GUESTS.items()]
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        for boot in boots:
            boot.user_data_seen.wait(max(1, deadline - time.monotonic()))
        for boot in boots:
            boot.interrupt() if boot.proc.poll() is None else None
        yield {boot.name: boot for boot in boots}
    finally:
        for boot in boots:
            if boot.proc.poll() is None:
                boot.proc.kill()
            invoke("destroy", "--name", boot.name)


def test_each_guest_gets_its_own_address_and_user_data(three_guests, pvlab_settings):
    for name, boot in three_guests.items():
        console = boot.output
        assert boot.user_data_seen.is_set(), f"{name}:\n{console[-3000:]}"
        ip = domain.ip_for_mac(GUESTS[name], pvlab_settings.bridge_network)
        assert f"got address {ip} " in console, console[-3000:]
        printed = console.split(sample.BEGIN_MARKER)[1].split(sample.END_MARKER)[0]
        assert json.loads(printed) == {"WHO": name}


def test_ctrl_c_with_keep_leaves_each_guest_running(three_guests, host):
    for name, boot in three_guests.items():
        assert boot.proc.returncode == 130, boot.output[-2000:]
        assert f"{name} keeps running" in boot.output
        assert host.run(f"xl domid {name}").rc == 0


def test_destroying_one_guest_leaves_the_others_rules_and_metadata(
    three_guests, host
):
    nat_before = host.check_output("iptables -w -t nat -S")
    # dom0's clock, which stamps the request log, not this host's.
    destroyed_at = _parse_time(host.check_output("date -u +%Y-%m-%dT%H:%M:%S"))

    result = invoke("destroy", "--name", "conc-b")

    assert result.returncode == 0, result.stderr
    nat_after = host.check_output("iptables -w -t nat -S")
    assert len(nat_after.splitlines()) < len(nat_before.splitlines())
    assert set(nat_after.splitlines()) < set(nat_before.splitlines())
    # The held guests ask for their instance-id every 10 s: fresh answers in
    # their request logs show their DNAT and registration still work.
    for name in ("conc-a", "conc-c"):
        assert _answered_after(name, destroyed_at), f"{name} got no answer after"
    assert host.run("xl domid conc-b").rc != 0
    assert not host.file("/var/lib/pvlab/imds/guests/conc-b.json").exists


def _answered_after(name: str, moment: datetime, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = invoke("metadata", "--name", name, "--log")
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[-1].endswith("/meta-data/instance-id") and (
                fields[3] == "200" and _parse_time(fields[0]) > moment
            ):
                return True
        time.sleep(5)
    return False


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
