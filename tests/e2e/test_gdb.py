"""gdb on real PV guests through gdbsx: the pvtest kernel stopped at its first
instruction and at a breakpoint, and a Debian kernel attached while it runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pvlab import image, sample

from helpers import invoke, pvkernel

XENCTX = "/usr/lib/xen-4.17/bin/xenctx"
PVTEST_GUEST = "gdbt-entry"
DEBIAN_GUEST = "gdbt-debian"
GUEST_ARGS = ("--memory", "256", "--instance-type", "t1.micro")






def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def gdbsx_ready(host):
    if "-gdbsx" not in host.check_output("xl info | grep xen_extra"):
        pytest.fail("dom0 does not run the gdbsx hypervisor; run `invoke provision`")


@pytest.fixture
def nothing_left(host):
    """After the test: no gdbsx and no guest of the test remain in dom0."""
    yield
    for name in (PVTEST_GUEST, DEBIAN_GUEST):
        if host.run(f"xl domid {name}").rc == 0:
            invoke("destroy", "--name", name, timeout=120)


def assert_nothing_left(host, name: str) -> None:
    assert host.run("pgrep -x gdbsx").rc != 0, host.run("ps -ef").stdout
    assert host.run("pgrep -x gdb").rc != 0
    assert host.run(f"xl domid {name}").rc != 0
    assert not host.file(f"/var/lib/pvlab/guests/{name}").exists


# ---------------------------------------------------------------- pvtest


@pytest.fixture(scope="module")
def pvtest(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvtest")
    volume = pvkernel.build_pv_test_volume(out)
    return volume, out / "kernel" / pvkernel.KERNEL_NAME


def test_gdb_stops_pvtest_at_its_entry_then_in_pvtest_compute(
    host, gdbsx_ready, pvtest, nothing_left
):
    volume, kernel = pvtest
    booted = invoke(
        "boot", "--image", str(volume), "--name", PVTEST_GUEST, "--debug", *GUEST_ARGS
    )
    assert booted.returncode == 0, output(booted)
    assert "spin at its entry 0x100000" in booted.stdout

    session = invoke(
        "gdb",
        "--name",
        PVTEST_GUEST,
        "--program",
        str(kernel),
        "--wait-for-kernel",
        "--break",
        "pvtest_compute",
        "--ex",
        "info registers rip",
        "--ex",
        "x/2bx 0x100000",
        "--ex",
        "continue",
        "--ex",
        "next",
        "--ex",
        "print/x seed",
        "--ex",
        "finish",
        "--batch",
    )

    text = output(session)
    assert session.returncode == 0, text
    assert f"{PVTEST_GUEST} stopped at its kernel entry 0x100000" in text
    assert re.search(r"rip\s+0x100000\s+0x100000 <_start>", text), text
    # The spin loop is gone: gdb stands on the kernel's own first bytes (cld).
    assert re.search(r"0x100000 <_start>:\s+0xfc\s+0x48", text), text
    assert re.search(r"Breakpoint 1, pvtest_compute \(rounds=7\)", text), text
    assert "$1 = 0x5eed1234" in text
    assert f"Value returned is $2 = {pvkernel.expected_compute()}" in text

    # Detached, pvtest finishes and powers off by itself.
    deadline = time.monotonic() + 120
    while host.run(f"xl domid {PVTEST_GUEST}").rc == 0 and time.monotonic() < deadline:
        time.sleep(2)
    invoke("destroy", "--name", PVTEST_GUEST, timeout=120)
    assert_nothing_left(host, PVTEST_GUEST)


def test_gdb_refuses_a_program_that_is_not_the_booted_kernel(
    host, gdbsx_ready, pvtest, tmp_path, nothing_left
):
    volume, kernel = pvtest
    other = tmp_path / "other.elf"
    data = bytearray(kernel.read_bytes())
    # Another build: same layout, other code bytes and no build id to compare.
    other.write_bytes(_without_build_id(bytes(data)))
    booted = invoke(
        "boot", "--image", str(volume), "--name", PVTEST_GUEST, "--debug", *GUEST_ARGS
    )
    assert booted.returncode == 0, output(booted)

    session = invoke("gdb", "--name", PVTEST_GUEST, "--program", str(other), "--batch")

    assert session.returncode == 1
    assert "is not the kernel gdbt-entry booted" in session.stderr
    assert host.run("pgrep -x gdbsx").rc != 0


def _without_build_id(elf: bytes) -> bytes:
    """The ELF with its build-id note's bytes and one code byte changed."""
    import io

    from elftools.elf.elffile import ELFFile

    changed = bytearray(elf)
    for section in ELFFile(io.BytesIO(elf)).iter_sections():
        if section.name == ".text":
            changed[section["sh_offset"] + 32] ^= 0xFF
    note = changed.find(b"GNU\0")
    changed[note + 4 : note + 24] = bytes(20)
    return bytes(changed)


# ---------------------------------------------------------------- Debian kernel


@pytest.fixture(scope="module")
def held_sample(pvlab_settings, tmp_path_factory):
    """The sample volume with pvlab.hold=1, so the guest stays up, and its kernel."""
    built = sample.build_sample_image(Path(pvlab_settings.cache_dir) / "images")
    out = tmp_path_factory.mktemp("debian")
    volume = out / "held.img"
    shutil.copyfile(built, volume)
    menu = out / "menu.lst"
    command_line = f"{sample.KERNEL_COMMAND_LINE} {sample.HOLD_OPTION}"
    menu.write_text(sample.menu_lst("hd0", command_line))
    script = out / "edit.cmd"
    script.write_text(
        f'rm /boot/grub/menu.lst\ncd /boot/grub\nwrite "{menu}" menu.lst\n'
    )
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(volume)],
        check=True,
        capture_output=True,
    )
    program = out / "program.bin"
    program.write_bytes(image.BootVolume(volume).read_file("/boot/program.bin"))
    assert (
        sample.HOLD_OPTION
        in image.BootVolume(volume).read_file("/boot/grub/menu.lst").decode()
    )
    return volume, program


def wait_in_linux(host, name: str, timeout: float = 300) -> None:
    """Until vcpu 0 runs in the kernel's high half twice in a row (PV-GRUB is done)."""
    domid = host.check_output(f"xl domid {name}")
    deadline = time.monotonic() + timeout
    hits = 0
    while time.monotonic() < deadline:
        ctx = host.run(f"{XENCTX} {domid} 0").stdout
        match = re.search(r"^rip: ([0-9a-f]+)", ctx, re.M)
        hits = (
            hits + 1 if match and int(match.group(1), 16) >= 0xFFFFFFFF80000000 else 0
        )
        if hits >= 2:
            return
        time.sleep(3)
    pytest.fail(f"{name} did not reach its Linux kernel in {timeout} s")


def test_gdb_attaches_to_a_running_debian_kernel_and_lets_it_run_on(
    host, gdbsx_ready, held_sample, tmp_path, nothing_left
):
    volume, program = held_sample
    booted = invoke(
        "boot", "--image", str(volume), "--name", DEBIAN_GUEST, "--paused", *GUEST_ARGS
    )
    assert booted.returncode == 0, output(booted)
    host.run_expect([0], f"xl unpause {DEBIAN_GUEST}")
    wait_in_linux(host, DEBIAN_GUEST)

    refused = invoke(
        "gdb",
        "--name",
        DEBIAN_GUEST,
        "--program",
        str(program),
        "--wait-for-kernel",
        "--batch",
    )
    assert refused.returncode == 1
    assert "not booted to be held at its kernel entry" in refused.stderr

    session = invoke(
        "gdb",
        "--name",
        DEBIAN_GUEST,
        "--program",
        str(program),
        "--batch",
        "--ex",
        "info registers rip rsp",
        "--ex",
        "x/i $pc",
    )
    text = output(session)
    assert session.returncode == 0, text
    assert re.search(r"rip\s+0xffffffff8[0-9a-f]{7}", text), text
    assert re.search(r"=> 0xffffffff8[0-9a-f]{7}", text), text
    assert f"{DEBIAN_GUEST} runs on" in text
    state = host.check_output(f"xl list {DEBIAN_GUEST}").splitlines()[-1].split()[4]
    assert "p" not in state
    assert host.run("pgrep -x gdbsx").rc != 0

    # The host's gdb, through an SSH tunnel, attaches just as well a second time.
    on_host = invoke(
        "gdb",
        "--name",
        DEBIAN_GUEST,
        "--program",
        str(program),
        "--batch",
        "--on-host",
        "--ex",
        "info registers rip",
    )
    assert on_host.returncode == 0, output(on_host)
    assert re.search(r"rip\s+0xffffffff8[0-9a-f]{7}", on_host.stdout), output(on_host)

    core = tmp_path / "debian.core"
    dumped = invoke("core", "--name", DEBIAN_GUEST, "--output", str(core))
    assert dumped.returncode == 0, output(dumped)
    opened = invoke(
        "gdb",
        "--core",
        str(core),
        "--program",
        str(program),
        "--batch",
        "--ex",
        "info registers rip",
        "--ex",
        "x/i $pc",
    )
    assert opened.returncode == 0, output(opened)
    assert re.search(r"rip\s+0xffffffff8[0-9a-f]{7}", opened.stdout), output(opened)
    assert re.search(r"=> 0xffffffff8[0-9a-f]{7}", opened.stdout), output(opened)

    assert invoke("destroy", "--name", DEBIAN_GUEST).returncode == 0
    assert_nothing_left(host, DEBIAN_GUEST)
