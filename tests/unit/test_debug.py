"""pvlab.debug without a VM: the spin-at-entry patch of a boot volume copy, the
kernel identity check, gdb's command list, the dom0 shell loops (run locally
against stand-ins for xenctx and xl) and the Xen core conversion read by gdb."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pvlab import debug, image
from pvlab.errors import ImageError

from helpers import pvkernel

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvtest")
    volumes = {
        (layout, compress): pvkernel.build_pv_test_volume(
            out, layout=layout, compress=compress
        )
        for layout in ("hd0", "hd00")
        for compress in (False, True)
    }
    return out, volumes


@pytest.fixture(scope="module")
def kernel(built) -> Path:
    return built[0] / "kernel" / pvkernel.KERNEL_NAME


def entry_of(kernel: Path) -> int:
    return image.Kernel.from_bytes(kernel.read_bytes()).entry


def fake_bzimage(payload: bytes) -> bytes:
    """A bzImage header (boot protocol 2.15) carrying payload after one setup sector."""
    data = bytearray(2 * 512)
    data[0x1F1] = 1
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    struct.pack_into("<II", data, 0x248, 0, len(payload))
    return bytes(data) + payload


# ---------------------------------------------------------------- the patch


@pytest.mark.parametrize("layout", ["hd0", "hd00"])
@pytest.mark.parametrize("compress", [False, True], ids=["elf", "gzip-elf"])
def test_debug_boot_patches_a_copy_so_the_kernel_spins_at_its_entry(
    built, kernel, tmp_path, layout, compress
):
    original = built[1][(layout, compress)]
    before = original.read_bytes()

    boot = debug.prepare_boot(image.BootVolume(original), tmp_path, spin=True)

    try:
        assert original.read_bytes() == before
        assert boot.image != original and boot.image.exists()
        entry = entry_of(kernel)
        assert boot.spin.entry == entry == 0x100000
        elf = kernel.read_bytes()
        offset = boot.spin.elf_offset
        # pvtest's _start begins with cld (fc) and the REX prefix of a movq (48).
        assert boot.spin.original == elf[offset : offset + 2] == b"\xfc\x48"
        patched = image.BootVolume(boot.image).read_file("/boot/program.bin")
        assert patched[offset : offset + 2] == debug.SPIN
        assert patched[:offset] == elf[:offset]
        assert patched[offset + 2 :] == elf[offset + 2 :]
        fs_offset = image.BootVolume(boot.image).filesystem_offset
        target = f"{boot.image}?offset={fs_offset}" if fs_offset else str(boot.image)
        fsck = subprocess.run(["e2fsck", "-fn", target], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert not [f for f in image.check(boot.image, flavor="pvgrub2") if f.is_error]
    finally:
        boot.discard()
    assert not boot.image.parent.exists()


def test_boot_without_debug_records_the_kernel_and_copies_the_users_file(built):
    volume = built[1][("hd0", False)]

    boot = debug.prepare_boot(image.BootVolume(volume), volume.parent, spin=False)

    assert boot.image == volume and boot.spin is None
    record = boot.record()
    assert record["kernel_path"] == "/boot/program.bin"
    assert record["kernel"]["build_id"]
    assert record["spin"] is None and record["released"] is False


def test_a_bzimage_kernel_is_booted_unpatched_with_one_sentence_why(kernel, tmp_path):
    identity = debug.KernelIdentity.of(fake_bzimage(gzip.compress(kernel.read_bytes())))

    refusal = debug.spin_refusal(identity)

    assert identity.format == "bzimage"
    assert refusal.count(".") == 1 and "bzImage" in refusal
    assert "leave out --wait-for-kernel" in refusal


def test_an_already_patched_volume_is_refused(built, tmp_path):
    boot = debug.prepare_boot(
        image.BootVolume(built[1][("hd0", False)]), tmp_path, spin=True
    )
    try:
        with pytest.raises(ImageError, match="already is `jmp .`"):
            debug.prepare_boot(image.BootVolume(boot.image), tmp_path, spin=True)
    finally:
        boot.discard()


def test_entry_outside_every_segment_is_refused(kernel):
    with pytest.raises(ImageError, match="lies in no loadable segment"):
        debug.entry_file_offset(kernel.read_bytes(), 0xDEAD0000)


# ---------------------------------------------------------------- identity


def test_the_same_kernel_matches_whether_raw_gzipped_or_in_a_bzimage(kernel):
    raw = kernel.read_bytes()
    booted = debug.KernelIdentity.of(raw)

    for form in (gzip.compress(raw), fake_bzimage(gzip.compress(raw))):
        assert debug.KernelIdentity.of(form).same_build(booted)
    assert debug.elf_image(fake_bzimage(gzip.compress(raw))) == raw


def test_another_build_does_not_match_by_build_id_or_by_segments(kernel):
    raw = bytearray(kernel.read_bytes())
    booted = debug.KernelIdentity.of(bytes(raw))
    other_id = bytearray(raw)
    other_id[raw.find(b"GNU\0") + 4] ^= 0xFF
    assert not debug.KernelIdentity.of(bytes(other_id)).same_build(booted)

    # Without build ids the loadable bytes decide.
    anonymous = debug.KernelIdentity.from_json({**booted.to_json(), "build_id": None})
    vaddr, memsz, _ = booted.segments[0]
    changed = debug.KernelIdentity.from_json(
        {**anonymous.to_json(), "segments": [[vaddr, memsz, "0" * 64]]}
    )
    assert anonymous.same_build(booted)
    assert not changed.same_build(anonymous)


def guest(record: dict | None) -> debug.GuestState:
    return debug.GuestState("gdbt-x", 7, True, record)


def test_gdb_refuses_a_program_that_is_not_the_booted_kernel(kernel, tmp_path):
    boot = debug.prepare_boot(
        image.BootVolume(pvkernel.build_pv_test_volume(tmp_path)), tmp_path, spin=False
    )
    other = tmp_path / "other.elf"
    data = bytearray(kernel.read_bytes())
    data[data.find(b"GNU\0") + 4] ^= 0xFF
    other.write_bytes(bytes(data))

    with pytest.raises(debug.DebugError) as error:
        debug.check_program(debug.Program.load(other), guest(boot.record()))

    assert "is not the kernel gdbt-x booted (its build id differ" in str(error.value)
    debug.check_program(debug.Program.load(kernel), guest(boot.record()))


def test_a_program_without_elf_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "program.bin"
    path.write_bytes(b"not a kernel")
    with pytest.raises(debug.DebugError, match="holds no ELF image"):
        debug.Program.load(path)
    with pytest.raises(debug.DebugError, match="does not exist"):
        debug.Program.load(tmp_path / "missing.bin")


# ---------------------------------------------------------------- session plan


SPIN = debug.SpinPatch(entry=0x100000, original=b"\xfc\x48", elf_offset=4096)


def test_waiting_session_restores_the_entry_then_sets_breaks_then_runs_commands():
    request = debug.GdbRequest(
        "gdbt-x",
        Path("p"),
        breaks=["pvtest_compute"],
        ex=["continue", "print seed"],
        batch=True,
    )

    commands = debug.gdb_commands(request, "127.0.0.1:4711", SPIN)

    assert commands.index("target remote 127.0.0.1:4711") < commands.index(
        "set {unsigned short}0x100000 = 0x48fc"
    )
    assert commands[-4:] == [
        "break pvtest_compute",
        "continue",
        "print seed",
        "disconnect",
    ]


def test_interactive_attach_neither_restores_nor_detaches():
    request = debug.GdbRequest("gdbt-x", Path("p"), ex=["info registers"])

    commands = debug.gdb_commands(request, "127.0.0.1:4711", None)

    assert not any(c.startswith("set {") for c in commands)
    assert commands[-1] == "info registers"
    assert "-batch" not in debug.gdb_argv(commands, "p", batch=False)


def test_held_guest_waits_by_default_and_others_attach():
    record = {"spin": SPIN.to_json(), "released": False}
    assert debug.spin_to_release(guest(record), None) == SPIN
    assert debug.spin_to_release(guest(dict(record, released=True)), None) is None
    assert debug.spin_to_release(guest(record), False) is None
    assert debug.spin_to_release(guest({"spin": None}), None) is None


def test_waiting_for_an_unpatched_guest_says_how_to_boot_it():
    with pytest.raises(debug.DebugError, match="invoke boot --debug"):
        debug.spin_to_release(guest({"spin": None}), True)
    refusal = "the kernel is a bzImage, which cannot be held."
    with pytest.raises(debug.DebugError, match="bzImage"):
        debug.spin_to_release(guest({"spin": None, "spin_refusal": refusal}), True)
    released = {"spin": SPIN.to_json(), "released": True}
    with pytest.raises(debug.DebugError, match="already left its entry"):
        debug.spin_to_release(guest(released), True)


@pytest.mark.parametrize(
    "log_text, fix",
    [
        ("ERROR:_check_hyp:Hyp is NOT enabled for gdbsx\n", "invoke provision"),
        ("sh: 1: /usr/local/sbin/gdbsx: not found\n", "has no /usr/local/sbin/gdbsx"),
        ("ERROR: can't bind address. errno:98\n", "errno:98"),
    ],
)
def test_gdbsx_failures_become_one_sentence_with_the_fix(log_text, fix):
    assert fix in debug.gdbsx_failure(log_text)


# ---------------------------------------------------------------- shell loops


def stand_ins(tmp_path: Path, rips: list[str], domain_exists: bool = True) -> dict:
    """A PATH with an `xl` and a xenctx that prints the given rips in turn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "rips").write_text("\n".join(rips) + "\n")
    xenctx = bin_dir / "xenctx"
    xenctx.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/n 2>/dev/null || echo 1)\n"
        f"echo $((n + 1)) > {tmp_path}/n\n"
        f'rip=$(sed -n "${{n}}p" {tmp_path}/rips)\n'
        f'[ -n "$rip" ] || rip=$(tail -n 1 {tmp_path}/rips)\n'
        'echo "rip: $rip"\necho "flags: 00000246 i z p"\n'
    )
    xl = bin_dir / "xl"
    xl.write_text(f"#!/bin/sh\nexit {0 if domain_exists else 1}\n")
    for tool in (xenctx, xl):
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_wait(tmp_path, monkeypatch, rips, timeout=5, exists=True):
    env = stand_ins(tmp_path, rips, exists)
    monkeypatch.setattr(debug, "XENCTX", str(tmp_path / "bin" / "xenctx"))
    script = debug.wait_at_entry_script(guest(None), 0x100000, timeout)
    started = time.monotonic()
    result = subprocess.run(
        ["sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    return result, time.monotonic() - started


def test_wait_ends_once_the_kernel_spins_at_its_entry(tmp_path, monkeypatch):
    grub = "0000000000012345"
    entry = "0000000000100000"

    result, _ = run_wait(tmp_path, monkeypatch, [grub, grub, entry, grub, entry, entry])

    assert result.returncode == 0 and result.stdout.split()[-1] == "reached"
    # A single sample at the entry (PV-GRUB passing by) was not enough.
    assert int((tmp_path / "n").read_text()) - 1 == 6


def test_wait_gives_up_at_its_deadline_and_names_the_last_rip(tmp_path, monkeypatch):
    result, took = run_wait(tmp_path, monkeypatch, ["0000000000012345"], timeout=2)

    assert result.returncode == 2
    assert result.stdout.splitlines()[-1] == "timeout 0000000000012345"
    assert took < 6


def test_wait_stops_when_the_guest_is_gone(tmp_path, monkeypatch):
    result, _ = run_wait(tmp_path, monkeypatch, ["0000000000012345"], exists=False)

    assert result.returncode == 3 and result.stdout.split()[-1] == "gone"


def test_kill_script_ends_only_the_named_process(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        spared = subprocess.run(
            ["sh", "-c", debug.kill_script(proc.pid, "gdbsx", 0)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.poll() is None and "killed" not in spared.stdout

        ended = subprocess.run(
            ["sh", "-c", debug.kill_script(proc.pid, "sleep", 0)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "killed" in ended.stdout
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reset_attaches_a_fresh_gdbsx_and_lets_it_detach_by_itself(
    tmp_path, monkeypatch
):
    # A stand-in gdbsx: serves one connection, then "detaches" and exits.
    fake = tmp_path / "gdbsx"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import socket, sys\n"
        "s = socket.socket()\n"
        "s.bind(('127.0.0.1', int(sys.argv[4])))\n"
        "s.listen(1)\n"
        "c, _ = s.accept()\n"
        "c.recv(1)\n"
        f"open('{tmp_path}/detached', 'w').write(' '.join(sys.argv[1:4]))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(debug, "GDBSX", str(fake))

    result = subprocess.run(
        ["sh", "-c", debug.gdbsx_reset_script(7)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "killed" not in result.stdout
    assert (tmp_path / "detached").read_text() == "-a 7 64"


def test_listening_check_sees_the_port_without_connecting(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0)
        port = server.getsockname()[1]
        result = subprocess.run(
            ["sh", "-c", debug.gdbsx_listening_script(os.getpid(), port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout.strip() == f"listening 127.0.0.1:{port}"
        with pytest.raises(BlockingIOError):
            server.accept()
        assert debug.is_listening(port, Path("/proc/net/tcp").read_text())
    assert not debug.is_listening(port, Path("/proc/net/tcp").read_text())


def test_listening_check_reports_a_gdbsx_that_exited():
    proc = subprocess.Popen(["true"])
    proc.wait()
    result = subprocess.run(
        ["sh", "-c", debug.gdbsx_listening_script(proc.pid, 1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "exited"


# ---------------------------------------------------------------- run_gdb


class FakeDom0:
    """Answers the dom0 commands of a session from canned outputs; records them."""

    def __init__(self, record: dict):
        self.record = record
        self.commands: list[str] = []

    def run(self, command, *, check=True, input=None, timeout=None):
        self.commands.append(command)
        out = ""
        if command.startswith("xl list"):
            out = "Name ID Mem VCPUs State Time(s)\ngdbt-x 7 256 1 --p--- 0.1\n"
        elif command.startswith("cat /var/lib/pvlab/guests/gdbt-x/debug.json"):
            out = json.dumps(self.record)
        return subprocess.CompletedProcess(command, 0, out, "")

    def ssh_argv(self, command, tty=False):
        return ["true", command]

    def copy_to(self, local, remote):
        self.commands.append(f"copy {remote}")


def test_a_mismatched_program_starts_nothing_in_dom0(kernel, tmp_path):
    boot = debug.prepare_boot(
        image.BootVolume(pvkernel.build_pv_test_volume(tmp_path)), tmp_path, spin=False
    )
    record = boot.record()
    record["kernel"]["build_id"] = "00" * 20
    dom0 = FakeDom0(record)
    request = debug.GdbRequest("gdbt-x", kernel, batch=True)

    with pytest.raises(debug.DebugError, match="is not the kernel gdbt-x booted"):
        debug.run_gdb(dom0, request, progress=lambda message: None)

    assert not any("gdbsx" in c or c.startswith("copy") for c in dom0.commands)


# ---------------------------------------------------------------- Xen cores


def _xen_core(path: Path) -> None:
    """A minimal `xl dump-core` of a PV guest: one vcpu stopped at 0x100000, whose
    page tables map 0x100000 to a page that starts with EB FE."""
    page = 4096
    # Machine frames: PML4, PDPT, PD, PT, the code page, and an unmapped page.
    mfns = [0x50, 0x51, 0x52, 0x53, 0x60, 0x61]
    tables = {m: bytearray(page) for m in mfns}
    present = 0x3

    def link(table, slot, target):
        struct.pack_into("<Q", tables[table], 8 * slot, (target << 12) | present)

    link(0x50, 0, 0x51)
    link(0x51, 0, 0x52)
    link(0x52, 0, 0x53)
    link(0x53, 0x100, 0x60)  # 0x100000 >> 12
    link(0x53, 0x101, 0x99)  # a frame the dump does not hold
    tables[0x60][:4] = b"\xeb\xfe\x90\x90"
    context = bytearray(5168)
    regs_at = debug._CTX_USER_REGS
    struct.pack_into("<Q", context, regs_at + 16 * 8, 0x100000)  # rip
    struct.pack_into("<Q", context, regs_at + 19 * 8, 0x291000)  # rsp
    struct.pack_into("<Q", context, regs_at + 17 * 8, 0xE033)  # cs
    struct.pack_into("<Q", context, debug._CTX_CR3, 0x50 << 12)
    p2m = b"".join(struct.pack("<QQ", pfn, mfn) for pfn, mfn in enumerate(mfns))
    pages = b"".join(bytes(tables[m]) for m in mfns)

    sections = [
        (b".xen_prstatus", bytes(context), 5168),
        (b".xen_p2m", p2m, 16),
        (b".xen_pages", pages, page),
    ]
    names = b"\0" + b"".join(name + b"\0" for name, _, _ in sections) + b".shstrtab\0"
    body = bytearray()
    headers = [bytes(64)]
    offset = 64
    name_at = 1
    for name, data, entsize in sections:
        headers.append(
            struct.pack(
                "<IIQQQQIIQQ",
                name_at,
                1,
                0,
                0,
                offset + len(body),
                len(data),
                0,
                0,
                8,
                entsize,
            )
        )
        body += data
        name_at += len(name) + 1
    headers.append(
        struct.pack(
            "<IIQQQQIIQQ", name_at, 3, 0, 0, offset + len(body), len(names), 0, 0, 1, 0
        )
    )
    body += names
    shoff = offset + len(body)
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack(
            "<HHIQQQIHHHHHH",
            4,
            62,
            1,
            0,
            0,
            shoff,
            0,
            64,
            56,
            0,
            64,
            len(headers),
            len(headers) - 1,
        )
    )
    path.write_bytes(ehdr + bytes(body) + b"".join(headers))


def test_a_xen_core_becomes_an_elf_core_whose_registers_and_memory_gdb_reads(
    tmp_path,
):
    if shutil.which("gdb") is None:
        pytest.skip("this host has no gdb")
    xen_core = tmp_path / "guest.core"
    _xen_core(xen_core)
    elf_core = debug.xen_core_to_elf(xen_core, tmp_path / "guest.elf-core")

    result = subprocess.run(
        [
            "gdb",
            "-q",
            "-nx",
            "-batch",
            "-ex",
            "set architecture i386:x86-64",
            "-ex",
            f"core-file {elf_core}",
            "-ex",
            "info registers rip rsp",
            "-ex",
            "x/4xb 0x100000",
            "-ex",
            "x/2xb 0x101000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    out = result.stdout + result.stderr
    assert "rip            0x100000" in out, out
    assert "rsp            0x291000" in out, out
    assert "0x100000:\t0xeb\t0xfe\t0x90\t0x90" in out, out
    assert "Cannot access memory at address 0x101000" in out, out


def test_a_file_that_is_no_xen_core_is_refused(kernel):
    with pytest.raises(debug.DebugError, match="not an `xl dump-core`"):
        debug.XenCore.parse(kernel.open("rb"), kernel.read_bytes())
