"""Role xen_debug: dom0 runs the gdbsx hypervisor, has gdbsx, and gdbsx serves
dom0's loopback only, never the guests' bridge."""

from __future__ import annotations

import re
import time

import pytest

GDBSX = "/usr/local/sbin/gdbsx"
# Names of what the tests create in dom0, so they cannot meet a user's.
DOMAIN = "gdbt-listen"
NETNS = "gdbt-probe"
VETH = "gdbt-veth"
PROBE_ADDRESS = "198.19.255.250/16"
PVGRUB = "/var/lib/pvlab/pvgrub/pvgrub2-x86_64-hd0.elf"


def test_running_hypervisor_is_the_gdbsx_build(host):
    xen_extra = re.search(
        r"^xen_extra\s*:\s*(\S+)", host.check_output("xl info"), re.MULTILINE
    )
    assert xen_extra and xen_extra.group(1).endswith("-gdbsx")


def test_gdbsx_is_installed(host):
    tool = host.file(GDBSX)
    assert tool.is_file and tool.mode == 0o755 and tool.user == "root"
    # Without arguments it prints its usage and exits 1, attaching to nothing.
    result = host.run(GDBSX)
    assert result.rc == 1 and "gdbsx -a domid" in result.stdout


@pytest.fixture
def gdbsx_listening(host):
    """gdbsx attached to a paused, never-run domain; yields its port and PID."""
    config = (
        f'name = "{DOMAIN}"\ntype = "pv"\nkernel = "{PVGRUB}"\nmemory = 32\nvcpus = 1\n'
    )
    host.run_expect([0], f"printf '%s' '{config}' > /tmp/{DOMAIN}.cfg")
    pid = None
    try:
        host.run_expect([0], f"xl create -p /tmp/{DOMAIN}.cfg")
        domid = host.check_output(f"xl domid {DOMAIN}")
        port = int(
            host.check_output(
                "python3 -c 'import socket; s = socket.socket(); "
                's.bind(("127.0.0.1", 0)); print(s.getsockname()[1])\''
            )
        )
        pid = host.check_output(
            f"setsid {GDBSX} -a {domid} 64 {port} </dev/null "
            f">/tmp/{DOMAIN}-gdbsx.log 2>&1 & echo $!"
        )
        deadline = time.monotonic() + 20
        while not host.run(f"ss -ltnH 'sport = :{port}'").stdout.strip():
            if time.monotonic() > deadline or not host.file(f"/proc/{pid}").exists:
                log = host.run(f"cat /tmp/{DOMAIN}-gdbsx.log").stdout
                pytest.fail(f"gdbsx did not start listening: {log}")
            time.sleep(0.5)
        yield port, pid
    finally:
        if pid:
            host.run(f'[ "$(cat /proc/{pid}/comm 2>/dev/null)" = gdbsx ] && kill {pid}')
        host.run(f"xl destroy {DOMAIN}")
        host.run(f"rm -f /tmp/{DOMAIN}.cfg /tmp/{DOMAIN}-gdbsx.log")


@pytest.fixture
def bridge_namespace(host):
    """A network namespace plugged into xenbr0, as a guest would be."""
    try:
        host.run_expect([0], f"ip netns add {NETNS}")
        host.run_expect([0], f"ip link add {VETH} type veth peer name {VETH}-ns")
        host.run_expect([0], f"ip link set {VETH}-ns netns {NETNS}")
        host.run_expect([0], f"ip link set {VETH} master xenbr0 up")
        host.run_expect(
            [0],
            f"ip netns exec {NETNS} sh -c 'ip link set lo up; "
            f"ip addr add {PROBE_ADDRESS} dev {VETH}-ns; ip link set {VETH}-ns up'",
        )
        yield NETNS
    finally:
        host.run(f"ip link del {VETH}")
        host.run(f"ip netns del {NETNS}")


def connect_command(address: str, port: int) -> str:
    return (
        "python3 -c 'import socket, sys; s = socket.socket(); s.settimeout(5); "
        f'r = s.connect_ex(("{address}", {port})); print(r); sys.exit(r != 0)\''
    )


def test_gdbsx_listens_on_loopback_only_and_the_bridge_cannot_reach_it(
    host, pvlab_settings, gdbsx_listening, bridge_namespace
):
    port, pid = gdbsx_listening

    listening = host.check_output(f"ss -ltnH 'sport = :{port}'").split("\n")
    assert [line.split()[3] for line in listening] == [f"127.0.0.1:{port}"]

    bridge = pvlab_settings.bridge_address
    # The namespace reaches dom0's bridge address, just not gdbsx on it.
    assert host.run(f"ip netns exec {bridge_namespace} ping -c 1 -W 5 {bridge}").rc == 0
    probe = host.run(
        f"ip netns exec {bridge_namespace} {connect_command(bridge, port)}"
    )
    assert probe.rc != 0, probe.stdout
    assert host.file(f"/proc/{pid}").exists

    # From dom0 itself the one connection gdbsx serves is accepted.
    assert host.run(connect_command("127.0.0.1", port)).rc == 0
