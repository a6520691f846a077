"""gdb sessions on guest kernels through gdbsx in dom0, including stopping a kernel at
its very first instruction, and core dumps of guests.

A guest booted for debugging carries a copy of its boot volume whose kernel entry
is patched to `jmp .` (EB FE): it boots normally through PV-GRUB and then spins at
its entry until gdb, attached through gdbsx, writes the original two bytes back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pvlab import image as image_mod
from pvlab.errors import DomainError, HostError, ImageError, PvlabError, VmError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

GDBSX = "/usr/local/sbin/gdbsx"
XENCTX = "/usr/lib/xen-4.17/bin/xenctx"
GUESTS_DIR = "/var/lib/pvlab/guests"
# What `invoke boot` records about the kernel it booted, read by `invoke gdb`.
RECORD_NAME = "debug.json"
# The symbol file gdb reads in dom0, beside the guest's boot volume.
PROGRAM_NAME = "program.elf"
GDBSX_LOG = "gdbsx.log"
# `jmp .`: the two-byte short jump to itself.
SPIN = b"\xeb\xfe"
# PV guests are 64-bit here: pvlab boots x86_64 PV kernels only.
GUEST_BITS = 64
# How long `invoke gdb` waits for PV-GRUB to start the kernel (TCG is slow).
DEFAULT_KERNEL_TIMEOUT = 300.0
POLL_INTERVAL = 0.3
# The same rip twice in a row: PV-GRUB only passes through, a spinning kernel stays.
SAMPLES_AT_ENTRY = 2
GDBSX_START_TIMEOUT = 20
CLEANUP_GRACE = 5


class DebugError(PvlabError):
    """A gdb session cannot be set up as asked."""


# ---------------------------------------------------------------- kernel identity


def elf_image(data: bytes) -> bytes | None:
    """The ELF image inside a kernel file: itself, gunzipped/unxz'd, or a bzImage's
    payload; None if there is none."""
    for magic, kind in ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz")):
        if data.startswith(magic):
            try:
                data = image_mod._decompress(kind, data)
            except ValueError:
                return None
            break
    if data.startswith(b"\x7fELF"):
        return data
    if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
        # Boot protocol 2.08+: the payload follows the real-mode setup sectors.
        if struct.unpack_from("<H", data, 0x206)[0] < 0x208:
            return None
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + offset
        payload = data[start : start + length]
        for magic, kind in image_mod._PAYLOAD_MAGICS:
            if payload.startswith(magic):
                if kind == "none":
                    return payload
                try:
                    return image_mod._decompress(kind, payload)
                except ValueError:
                    return None
    return None


@dataclass(frozen=True)
class KernelIdentity:
    """What tells two kernel builds apart: build id, else the loadable segments."""

    format: str  # "elf", "bzimage" or "unknown", as image.Kernel says
    wrapper: str | None
    entry: int | None
    build_id: str | None
    segments: tuple[tuple[int, int, str], ...]  # (vaddr, memsz, sha256 of bytes)

    @classmethod
    def of(cls, data: bytes) -> KernelIdentity:
        kernel = image_mod.Kernel.from_bytes(data)
        elf = elf_image(data)
        segments = []
        if elf is not None and kernel.has_elf:
            for s in kernel.loadable_segments:
                digest = hashlib.sha256(elf[s.offset : s.offset + s.filesz])
                segments.append((s.vaddr, s.memsz, digest.hexdigest()))
        return cls(
            format=kernel.format,
            wrapper=kernel.wrapper,
            entry=xen_entry(kernel),
            build_id=kernel.build_id,
            segments=tuple(segments),
        )

    def same_build(self, other: KernelIdentity) -> bool:
        if self.build_id and other.build_id:
            return self.build_id == other.build_id
        return bool(self.segments) and self.segments == other.segments

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> KernelIdentity:
        return cls(
            format=data["format"],
            wrapper=data.get("wrapper"),
            entry=data.get("entry"),
            build_id=data.get("build_id"),
            segments=tuple(tuple(s) for s in data.get("segments", ())),
        )


def xen_entry(kernel: image_mod.Kernel) -> int | None:
    """Where Xen starts the kernel: the ENTRY note if it has one, else e_entry."""
    note = kernel.xen_notes.get("ENTRY")
    return note if isinstance(note, int) else kernel.entry


# ---------------------------------------------------------------- spin at entry


@dataclass(frozen=True)
class SpinPatch:
    """The kernel entry patched to `jmp .`, and the bytes to put back."""

    entry: int
    original: bytes
    elf_offset: int  # of the entry in the (uncompressed) ELF file

    @property
    def restore_value(self) -> int:
        """The original bytes as gdb's little-endian `unsigned short`."""
        return int.from_bytes(self.original, "little")

    def to_json(self) -> dict:
        return {
            "entry": self.entry,
            "original": self.original.hex(),
            "elf_offset": self.elf_offset,
        }

    @classmethod
    def from_json(cls, data: dict) -> SpinPatch:
        return cls(data["entry"], bytes.fromhex(data["original"]), data["elf_offset"])


def entry_file_offset(elf: bytes, entry: int) -> int:
    """The ELF file offset holding the first two bytes of the entry point."""
    try:
        segments = [
            s
            for s in ELFFile(io.BytesIO(elf)).iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
    except (ELFError, ValueError, struct.error) as error:
        raise ImageError(f"the kernel's ELF image is damaged ({error}).") from None
    for field_name in ("p_vaddr", "p_paddr"):
        for s in segments:
            start = s[field_name]
            if start <= entry and entry + len(SPIN) <= start + s["p_filesz"]:
                return s["p_offset"] + entry - start
    raise ImageError(
        f"the kernel's entry point {entry:#x} lies in no loadable segment's file "
        "bytes, so pvlab cannot hold it there; check how the kernel is linked."
    )


def spin_refusal(identity: KernelIdentity | None) -> str | None:
    """Why the kernel cannot be held at its entry, or None if it can."""
    if identity is None or identity.format == "unknown":
        return (
            "the boot volume's kernel could not be read as an ELF image, so pvlab "
            "cannot hold it at its entry; attach to it as it runs instead "
            "(leave out --wait-for-kernel)."
        )
    if identity.format == "bzimage":
        return (
            "the kernel is a bzImage, whose compressed payload pvlab does not "
            "rewrite, so it cannot be held at its entry; attach to it as it runs "
            "instead (leave out --wait-for-kernel)."
        )
    if identity.entry is None:
        return "the kernel names no entry point; link it with one."
    return None


@dataclass
class DebugBoot:
    """What `invoke boot` copies into dom0 and records for `invoke gdb`."""

    image: Path  # the volume to copy: the user's, or a patched copy
    identity: KernelIdentity | None
    kernel_path: str | None
    spin: SpinPatch | None = None
    refusal: str | None = None
    _workdir: Path | None = None

    def record(self) -> dict:
        return {
            "kernel_path": self.kernel_path,
            "kernel": self.identity.to_json() if self.identity else None,
            "spin": self.spin.to_json() if self.spin else None,
            "spin_refusal": self.refusal,
            "released": False,
        }

    def record_file(self, guest_dir: str) -> dict[str, str]:
        """The record as a file for Guests.prepare to write beside the guest."""
        return {f"{guest_dir}/{RECORD_NAME}": json.dumps(self.record()) + "\n"}

    def discard(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def prepare_boot(
    volume: image_mod.BootVolume, work_root: Path, *, spin: bool
) -> DebugBoot:
    """Identify the volume's kernel; with spin, patch a copy of the volume so the
    kernel spins at its entry (the user's file is never changed)."""
    kernel_path = volume.kernel_path
    identity = None
    data = b""
    if kernel_path:
        try:
            data = volume.read_file(kernel_path)
            identity = KernelIdentity.of(data)
        except (OSError, ImageError):
            identity = None
    boot = DebugBoot(image=volume.path, identity=identity, kernel_path=kernel_path)
    if not spin:
        return boot
    boot.refusal = spin_refusal(identity)
    if boot.refusal:
        return boot
    work_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".debug-boot-", dir=work_root))
    boot._workdir = workdir
    try:
        copy = workdir / f"{volume.path.stem}-debug.img"
        shutil.copyfile(volume.path, copy)
        boot.spin = patch_entry(
            image_mod.BootVolume(copy), kernel_path, data, identity.entry, workdir
        )
        boot.image = copy
    except BaseException:
        boot.discard()
        raise
    return boot


def patch_entry(
    volume: image_mod.BootVolume,
    kernel_path: str,
    data: bytes,
    entry: int,
    workdir: Path,
) -> SpinPatch:
    """Write `jmp .` over the kernel's entry inside the volume image, unmounted."""
    real_path = _real_path(volume, kernel_path)
    elf = elf_image(data)
    assert elf is not None  # spin_refusal let only ELF kernels through
    offset = entry_file_offset(elf, entry)
    patch = SpinPatch(entry=entry, original=elf[offset : offset + 2], elf_offset=offset)
    if patch.original == SPIN:
        raise ImageError(
            f"{volume.path}: the kernel's entry already is `jmp .` (EB FE); give "
            "the volume as it was built, not one pvlab patched."
        )
    if data.startswith(b"\x7fELF"):
        _write_in_place(volume, real_path, offset)
    else:
        # Compressed bytes cannot be patched in place: store the ELF uncompressed,
        # which PV-GRUB loads as well.
        patched = bytearray(elf)
        patched[offset : offset + 2] = SPIN
        _replace_file(volume, real_path, bytes(patched), workdir)
    written = image_mod.BootVolume(volume.path).read_file(real_path)
    if written[offset : offset + 2] != SPIN:
        raise ImageError(
            f"pvlab could not patch the kernel entry in its copy of {volume.path} "
            "(debugfs reported no error); check the volume with e2fsck -n."
        )
    log.info("kernel entry %#x patched to spin in the debug copy", entry)
    return patch


def _real_path(volume: image_mod.BootVolume, path: str) -> str:
    resolved = volume._resolve(path)
    if resolved is None:
        raise ImageError(f"{volume.path}: the kernel {path} is not in the filesystem.")
    return resolved[1]


def _debugfs(volume: image_mod.BootVolume, *args: str) -> subprocess.CompletedProcess:
    return image_mod._run(["debugfs", *args, volume._target])


def _block_size(volume: image_mod.BootVolume) -> int:
    result = image_mod._run(["dumpe2fs", "-h", volume._target])
    match = re.search(r"^Block size:\s*(\d+)", result.stdout, re.M)
    if not match:
        raise ImageError(f"dumpe2fs could not read the block size of {volume.path}.")
    return int(match.group(1))


def _write_in_place(volume: image_mod.BootVolume, path: str, offset: int) -> None:
    block_size = _block_size(volume)
    for index, byte in enumerate(SPIN):
        position = offset + index
        logical = position // block_size
        result = _debugfs(volume, "-R", f'bmap "{path}" {logical}')
        physical = result.stdout.strip().splitlines()[-1:] or [""]
        if result.returncode != 0 or not physical[0].isdigit() or physical[0] == "0":
            raise ImageError(
                f"debugfs found no data block for byte {position} of {path} in "
                f"{volume.path}; check the volume with e2fsck -n."
            )
        where = volume.filesystem_offset + int(physical[0]) * block_size
        with volume.path.open("r+b") as handle:
            handle.seek(where + position % block_size)
            handle.write(bytes([byte]))


def _replace_file(
    volume: image_mod.BootVolume, path: str, data: bytes, workdir: Path
) -> None:
    local = workdir / "kernel.elf"
    local.write_bytes(data)
    directory, name = path.rsplit("/", 1)
    script = workdir / "debugfs.cmd"
    script.write_text(
        f'rm "{path}"\ncd "{directory or "/"}"\nwrite "{local}" "{name}"\n'
    )
    result = _debugfs(volume, "-w", "-f", str(script))
    if "No space left" in result.stderr or "Could not allocate" in result.stderr:
        raise ImageError(
            f"{volume.path} has no room for the kernel uncompressed "
            f"({len(data)} bytes); rebuild the volume larger to hold it at its entry."
        )


# ---------------------------------------------------------------- guests in dom0


@dataclass
class GuestState:
    name: str
    domid: int
    paused: bool
    record: dict | None

    @property
    def guest_dir(self) -> str:
        return f"{GUESTS_DIR}/{self.name}"

    @property
    def spin(self) -> SpinPatch | None:
        spin = (self.record or {}).get("spin")
        return SpinPatch.from_json(spin) if spin else None

    @property
    def identity(self) -> KernelIdentity | None:
        kernel = (self.record or {}).get("kernel")
        return KernelIdentity.from_json(kernel) if kernel else None

    @property
    def is_held(self) -> bool:
        """Booted to spin at its entry and not released yet."""
        return self.spin is not None and not (self.record or {}).get("released")


def guest_state(dom0, name: str) -> GuestState:
    q = shlex.quote(name)
    result = dom0.run(f"xl list {q}", check=False)
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    parts = lines[-1].split() if len(lines) >= 2 else []
    if len(parts) < 6 or parts[0] != name:
        raise DomainError(
            f"no guest named {name} runs; boot it with `invoke boot --debug --image "
            f"IMG --name {name}` (see `invoke list`)."
        )
    record_text = dom0.run(
        f"cat {GUESTS_DIR}/{q}/{RECORD_NAME} 2>/dev/null", check=False
    ).stdout
    try:
        record = json.loads(record_text) if record_text.strip() else None
    except ValueError:
        record = None
    return GuestState(name, int(parts[1]), "p" in parts[4], record)


def set_released(dom0, guest: GuestState) -> None:
    record = dict(guest.record or {}, released=True)
    path = f"{guest.guest_dir}/{RECORD_NAME}"
    dom0.run(f"cat > {shlex.quote(path)}", input=json.dumps(record) + "\n")


def wait_at_entry_script(guest: GuestState, entry: int, timeout: float) -> str:
    """A bounded shell loop in dom0 that returns once vcpu 0 spins at entry."""
    want = f"{entry:016x}"
    name = shlex.quote(guest.name)
    # The dot per round lets the loop die of SIGPIPE when `invoke gdb` is gone.
    return (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); hits=0; rip=none; "
        f"while [ $(date +%s) -lt $deadline ]; do "
        f"xl domid {name} >/dev/null 2>&1 || {{ echo; echo gone; exit 3; }}; "
        f"rip=$({XENCTX} {guest.domid} 0 2>/dev/null "
        "| sed -n 's/^rip: \\([0-9a-f]*\\).*/\\1/p'); "
        f'if [ "$rip" = {want} ]; then hits=$((hits+1)); '
        f"[ $hits -ge {SAMPLES_AT_ENTRY} ] && {{ echo; echo reached; exit 0; }}; "
        "else hits=0; fi; "
        f'printf .; sleep {POLL_INTERVAL}; done; echo; echo "timeout $rip"; exit 2'
    )


def wait_for_entry(
    dom0, guest: GuestState, entry: int, timeout: float, progress: Progress
) -> None:
    if guest.paused:
        dom0.run(f"xl unpause {shlex.quote(guest.name)}")
    progress(
        f"{guest.name} boots through PV-GRUB; waiting up to {timeout:.0f} s for "
        f"its kernel to reach its entry {entry:#x}"
    )
    result = dom0.run(
        wait_at_entry_script(guest, entry, timeout), check=False, timeout=timeout + 60
    )
    outcome = (result.stdout.strip().splitlines() or [""])[-1]
    if outcome == "reached":
        return
    if outcome == "gone":
        raise DebugError(
            f"{guest.name} stopped before its kernel started; read its console with "
            f"`invoke boot` again without --debug to see why."
        )
    rip = outcome.partition(" ")[2] or "unknown"
    raise DebugError(
        f"{guest.name}'s kernel did not reach its entry {entry:#x} within "
        f"{timeout:.0f} s (vcpu 0 is at {rip}); check its console with `xl console "
        f"{guest.name}` in dom0, or give more time with --timeout."
    )


def free_port_command() -> str:
    return (
        "python3 -c 'import socket; s = socket.socket(); "
        's.bind(("127.0.0.1", 0)); print(s.getsockname()[1])\''
    )


def gdbsx_start_script(guest: GuestState, port: int) -> str:
    """Start gdbsx detached from the SSH session; print its PID."""
    log_path = shlex.quote(f"{guest.guest_dir}/{GDBSX_LOG}")
    return (
        f"setsid {GDBSX} -a {guest.domid} {GUEST_BITS} {port} "
        f"</dev/null >{log_path} 2>&1 & echo $!"
    )


def gdbsx_listening_script(pid: int, port: int) -> str:
    """Wait, bounded, until gdbsx listens; print listening, or exited and its log.

    It must not connect to the port: gdbsx serves one connection and then exits.
    """
    return (
        f"i=0; while [ $i -lt {GDBSX_START_TIMEOUT * 4} ]; do "
        f"if ss -ltnH 'sport = :{port}' | grep -q .; then "
        f"ss -ltnH 'sport = :{port}' | awk '{{print \"listening \" $4}}'; exit 0; fi; "
        f"[ -d /proc/{pid} ] || {{ echo exited; exit 1; }}; "
        "sleep 0.25; i=$((i+1)); done; echo timeout; exit 1"
    )


def gdbsx_failure(log_text: str) -> str:
    """The user's fix for a gdbsx that would not attach, from its log."""
    if "NOT enabled for gdbsx" in log_text or "errno:38" in log_text:
        return (
            "the running Xen hypervisor was built without gdbsx support; run "
            "`invoke provision` to install and boot pvlab's gdbsx hypervisor."
        )
    if "No such file" in log_text or "not found" in log_text:
        return f"dom0 has no {GDBSX}; run `invoke provision` to install it."
    last = (log_text.strip().splitlines() or ["no message"])[-1]
    return f"gdbsx could not attach ({last}); see {GDBSX_LOG} in the guest's directory."


@dataclass
class Gdbsx:
    """One gdbsx process in dom0, attached to one guest on one loopback port."""

    dom0: object
    guest: GuestState
    port: int = 0
    pid: int = 0

    def start(self) -> None:
        result = self.dom0.run(free_port_command())
        self.port = int(result.stdout.strip())
        self.pid = int(self.dom0.run(gdbsx_start_script(self.guest, self.port)).stdout)
        log.debug("gdbsx pid %d on 127.0.0.1:%d", self.pid, self.port)
        check = self.dom0.run(
            gdbsx_listening_script(self.pid, self.port),
            check=False,
            timeout=GDBSX_START_TIMEOUT + 30,
        )
        status = check.stdout.strip()
        if status.startswith("listening"):
            address = status.split()[-1]
            if not address.startswith("127.0.0.1:"):
                self.stop()
                raise DebugError(
                    f"gdbsx listens on {address}, beyond dom0's loopback; run "
                    "`invoke provision` to install pvlab's patched gdbsx."
                )
            return
        text = self.dom0.run(
            f"cat {shlex.quote(self.guest.guest_dir + '/' + GDBSX_LOG)}", check=False
        ).stdout
        self.stop()
        raise DebugError(gdbsx_failure(text))

    def stop(self) -> bool:
        """End gdbsx if it still runs; True if it had to be killed."""
        if not self.pid:
            return False
        result = self.dom0.run(kill_script(self.pid, "gdbsx"), check=False, timeout=60)
        self.pid = 0
        if "killed" not in result.stdout:
            return False
        # A killed gdbsx leaves the domain in debug mode, where the guest's own
        # int3 (Linux patches code with it) would pause it for good; one more
        # gdbsx that sees its connection close switches debug mode off.
        self.dom0.run(gdbsx_reset_script(self.guest.domid), check=False, timeout=60)
        return True


def gdbsx_reset_script(domid: int) -> str:
    """Attach gdbsx and close its connection at once: it then leaves debug mode,
    undoes its own pause and exits."""
    connect = (
        "import socket, sys, time\n"
        "port = int(sys.argv[1])\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), 1).close()\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
    )
    return (
        f"port=$({free_port_command()}); "
        f"setsid {GDBSX} -a {domid} {GUEST_BITS} $port </dev/null >/dev/null 2>&1 & "
        f"pid=$!; python3 -c {shlex.quote(connect)} $port; "
        + kill_script("$pid", "gdbsx", grace=5)
    )


def kill_script(pid: int | str, comm: str, grace: int = CLEANUP_GRACE) -> str:
    """Wait a little for a process to end by itself, then TERM (and KILL) it.

    pid may be a shell expression such as "$pid". The command name is checked
    each time, so a reused PID is never hit.
    """
    alive = f'[ "$(cat /proc/{pid}/comm 2>/dev/null)" = {shlex.quote(comm)} ]'
    return (
        f"i=0; while {alive} && [ $i -lt {grace * 4} ]; do sleep 0.25; "
        "i=$((i+1)); done; "
        f"if {alive}; then kill {pid}; i=0; "
        f"while {alive} && [ $i -lt 20 ]; do sleep 0.25; i=$((i+1)); done; "
        f"{alive} && kill -9 {pid}; echo killed; fi"
    )


# ---------------------------------------------------------------- gdb


@dataclass
class GdbRequest:
    name: str
    program: Path
    breaks: Sequence[str] = ()
    ex: Sequence[str] = ()
    batch: bool = False
    wait_for_kernel: bool | None = None  # None: wait if the guest is held
    on_host: bool = False
    timeout: float = DEFAULT_KERNEL_TIMEOUT


@dataclass
class Program:
    """The user's kernel file and the ELF image gdb reads symbols from."""

    path: Path
    identity: KernelIdentity
    elf: bytes

    @classmethod
    def load(cls, path: Path) -> Program:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DebugError(
                f"program file {path} does not exist; give the kernel the guest "
                "boots (program.bin of its boot volume) with --program."
            ) from None
        except OSError as error:
            raise DebugError(
                f"program file {path} cannot be read ({error.strerror})."
            ) from None
        elf = elf_image(data)
        if elf is None:
            raise DebugError(
                f"{path} holds no ELF image (nor a gzip'd ELF or bzImage), so gdb "
                "finds no symbols in it; give the kernel's ELF file with --program."
            )
        return cls(Path(path), KernelIdentity.of(data), elf)


def check_program(program: Program, guest: GuestState) -> None:
    booted = guest.identity
    if booted is None:
        log.warning(
            "%s has no record of its kernel; cannot check that %s matches it",
            guest.name,
            program.path,
        )
        return
    if not program.identity.same_build(booted):
        how = (
            "build id"
            if booted.build_id and program.identity.build_id
            else ("loadable segments")
        )
        raise DebugError(
            f"{program.path} is not the kernel {guest.name} booted (its {how} "
            f"differ from {guest.record.get('kernel_path') or 'the kernel'} in the "
            "boot volume); give the program.bin of the image you booted."
        )


def gdb_commands(
    request: GdbRequest, port_address: str, spin: SpinPatch | None
) -> list[str]:
    """The gdb commands of one session, in order, as -ex arguments."""
    commands = ["set pagination off", "set confirm off"]
    if request.batch:
        # A failed command must not stop the batch before the detach at its end.
        commands.append("set height 0")
    commands.append(f"target remote {port_address}")
    if spin is not None:
        commands += [
            f"set {{unsigned short}}{spin.entry:#x} = {spin.restore_value:#06x}",
            (
                f"echo pvlab: {request.name} stopped at its kernel entry "
                f"{spin.entry:#x}, original code restored\\n"
            ),
            "frame",
        ]
    commands += [f"break {symbol}" for symbol in request.breaks]
    commands += list(request.ex)
    if request.batch:
        # gdbsx exits on a `detach` before it answers it, so gdb would report
        # the lost connection as an error; on a plain disconnect gdbsx resumes
        # the guest and exits all the same.
        commands.append("disconnect")
    return commands


def gdb_argv(commands: Sequence[str], program: str, batch: bool) -> list[str]:
    argv = ["gdb", "-q", "-nx"]
    if batch:
        argv.append("-batch")
    for command in commands:
        argv += ["-ex", command]
    return [*argv, program]


def dom0_gdb_command(argv: Sequence[str], pid_file: str) -> str:
    # The PID lets the clean-up end a gdb whose SSH session was cut.
    return f"echo $$ > {shlex.quote(pid_file)}; exec {shlex.join(argv)}"


def run_gdb(dom0, request: GdbRequest, progress: Progress) -> int:
    """Attach gdb to a guest kernel through gdbsx; gdb's exit status."""
    program = Program.load(request.program)
    guest = guest_state(dom0, request.name)
    check_program(program, guest)
    spin = spin_to_release(guest, request.wait_for_kernel)
    if not request.on_host:
        _install_program(dom0, program, f"{guest.guest_dir}/{PROGRAM_NAME}", progress)
    if spin is not None:
        wait_for_entry(dom0, guest, spin.entry, request.timeout, progress)
    gdbsx = Gdbsx(dom0, guest)
    gdbsx.start()
    progress(
        f"gdbsx attached to {guest.name} (domid {guest.domid}) on dom0's "
        f"127.0.0.1:{gdbsx.port}; the guest is stopped"
    )
    pid_file = f"{guest.guest_dir}/gdb.pid"
    try:
        if spin is not None:
            # gdb's first command puts the bytes back; from now on the entry is
            # the kernel's own code.
            set_released(dom0, guest)
        if request.on_host:
            return _gdb_on_host(dom0, request, program, gdbsx.port, spin, progress)
        commands = gdb_commands(request, f"127.0.0.1:{gdbsx.port}", spin)
        argv = gdb_argv(commands, f"{guest.guest_dir}/{PROGRAM_NAME}", request.batch)
        remote = dom0_gdb_command(argv, pid_file)
        progress("starting gdb in dom0")
        return _call(
            dom0.ssh_argv(f"sudo sh -c {shlex.quote(remote)}", tty=not request.batch),
            timeout=request.timeout if request.batch else None,
        )
    finally:
        if not request.on_host:
            dom0.run(
                f"if [ -r {pid_file} ]; then {kill_script_from_file(pid_file, 'gdb')}; "
                f"fi; rm -f {pid_file}",
                check=False,
                timeout=60,
            )
        if gdbsx.stop():
            log.info("gdbsx did not end with gdb; pvlab stopped it")
        try:
            state = guest_state(dom0, guest.name)
        except DomainError:
            state = None
        if state is None:
            progress(f"gdb has ended; {guest.name} is gone")
        elif state.paused:
            progress(
                f"gdb has ended; {guest.name} is paused (`xl unpause {guest.name}` "
                "in dom0 resumes it, `invoke destroy` removes it)"
            )
        else:
            progress(f"gdb has ended; {guest.name} runs on")


def spin_to_release(
    guest: GuestState, wait_for_kernel: bool | None
) -> SpinPatch | None:
    """The patch gdb must undo, if this session waits for the kernel's entry."""
    wait = guest.is_held if wait_for_kernel is None else wait_for_kernel
    if not wait:
        if guest.is_held:
            log.warning(
                "%s spins at its kernel entry until `invoke gdb --wait-for-kernel` "
                "releases it",
                guest.name,
            )
        return None
    if guest.spin is None:
        raise DebugError(
            (guest.record or {}).get("spin_refusal")
            or f"{guest.name} was not booted to be held at its kernel entry; boot it "
            "with `invoke boot --debug`, or leave out --wait-for-kernel to attach "
            "to it as it runs."
        )
    if not guest.is_held:
        raise DebugError(
            f"{guest.name}'s kernel already left its entry (an earlier `invoke gdb` "
            "released it); leave out --wait-for-kernel to attach to it as it runs."
        )
    return guest.spin


def _gdb_on_host(
    dom0, request: GdbRequest, program: Program, port: int, spin, progress: Progress
) -> int:
    if shutil.which("gdb") is None:
        raise HostError(
            "this host has no gdb; install the gdb package or leave out --on-host."
        )
    tunnel = Tunnel(dom0, port)
    tunnel.open()
    try:
        with tempfile.TemporaryDirectory(prefix="pvlab-gdb-") as tmp:
            symbols = Path(tmp) / PROGRAM_NAME
            symbols.write_bytes(program.elf)
            commands = gdb_commands(request, f"127.0.0.1:{tunnel.local_port}", spin)
            progress("starting gdb on this host through an SSH tunnel")
            return _call(
                gdb_argv(commands, str(symbols), request.batch),
                timeout=request.timeout if request.batch else None,
            )
    finally:
        tunnel.close()


def _install_program(dom0, program: Program, remote: str, progress: Progress) -> None:
    """Copy the symbol file into dom0 unless the same bytes are there already."""
    digest = hashlib.sha256(program.elf).hexdigest()
    there = dom0.run(f"sha256sum {shlex.quote(remote)} 2>/dev/null", check=False)
    if there.stdout.split()[:1] == [digest]:
        return
    progress(f"copying {program.path.name} into dom0 for gdb")
    _copy_bytes(dom0, program.elf, remote)


def kill_script_from_file(pid_file: str, comm: str) -> str:
    return f"pid=$(cat {shlex.quote(pid_file)}); {kill_script('$pid', comm, grace=2)}"


def _call(argv: list[str], timeout: float | None = None) -> int:
    """Run argv attached to the terminal; its exit status.

    timeout bounds a --batch session, whose `continue` could wait forever.
    """
    log.debug("running %s", shlex.join(argv))
    with subprocess.Popen(argv) as proc:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc)
            raise DebugError(
                f"the gdb batch did not finish within {timeout:.0f} s (a `continue` "
                "that never stops?); give it longer with --timeout."
            ) from None
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached ssh (or gdb) too; give it a moment.
            _end(proc, grace=5)
            raise


def _end(proc: subprocess.Popen, grace: float = 0) -> None:
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _copy_bytes(dom0, data: bytes, remote: str) -> None:
    with tempfile.NamedTemporaryFile(prefix="pvlab-", suffix=".elf") as handle:
        handle.write(data)
        handle.flush()
        dom0.copy_to(Path(handle.name), remote)


# ---------------------------------------------------------------- SSH tunnel


def local_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int, tcp_table: str) -> bool:
    """True if /proc/net/tcp text shows 127.0.0.1:port in LISTEN state."""
    wanted = f"0100007F:{port:04X}"
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
            return True
    return False


@dataclass
class Tunnel:
    """An `ssh -L` from this host's loopback to gdbsx on dom0's loopback."""

    dom0: object
    remote_port: int
    local_port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        # Its own connection, not the shared master of Dom0.ssh_argv: a forward
        # set up through the master would outlive this process.
        return [
            "ssh", "-F", str(self.dom0.ssh_config()), "-o", "LogLevel=ERROR",
            "-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes", "-N",
            "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}",
            "dom0",
        ]  # fmt: skip

    def open(self, timeout: float = 30) -> None:
        self.local_port = local_free_port()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        # Watch the listen table instead of connecting: gdbsx takes one
        # connection only, and a probe would use it up.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VmError("the SSH tunnel to gdbsx in dom0 could not be opened.")
            if is_listening(self.local_port, Path("/proc/net/tcp").read_text()):
                return
            time.sleep(0.2)
        self.close()
        raise VmError("the SSH tunnel to gdbsx in dom0 did not come up in time.")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------- core dumps


def dump_core(dom0, name: str, output: Path, progress: Progress) -> Path:
    """`xl dump-core` of a guest in dom0, copied to output on this host."""
    guest = guest_state(dom0, name)
    remote = f"{guest.guest_dir}/core.{int(time.time())}"
    progress(f"dumping the memory of {name} (domid {guest.domid}) in dom0")
    result = dom0.run(
        f"xl dump-core {shlex.quote(name)} {shlex.quote(remote)}",
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        dom0.run(f"rm -f {shlex.quote(remote)}", check=False)
        raise DebugError(dump_core_failure(name, result.stderr))
    try:
        progress(f"copying the core to {output}")
        copy_from(dom0, remote, output)
    finally:
        dom0.run(f"rm -f {shlex.quote(remote)}", check=False)
    return output


def dump_core_failure(name: str, stderr: str) -> str:
    if "p2m_size" in stderr:
        # libxc finds a PV guest's pages through the list its kernel publishes.
        return (
            f"Xen cannot dump {name}: its kernel has not published its pfn-to-mfn "
            "list (shared_info's pfn_to_mfn_frame_list_list, which Linux and "
            "Mini-OS fill early in boot); dump it once its kernel has set that up."
        )
    reason = (stderr.strip().splitlines() or ["no message"])[-1]
    return f"xl dump-core of {name} failed ({reason}); see /var/log/xen/ in dom0."


def copy_from(dom0, remote: str, local: Path) -> None:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".part")
    argv = dom0.ssh_argv(f"sudo cat {shlex.quote(remote)}")
    with partial.open("wb") as sink:
        result = subprocess.run(argv, stdout=sink, stderr=subprocess.PIPE)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise VmError(
            f"copying {remote} out of dom0 failed: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    os.replace(partial, local)


# ---------------------------------------------------------------- Xen cores for gdb

# Offsets in Xen's x86_64 vcpu_guest_context (xen/include/public/arch-x86/xen.h):
# 512 bytes of FPU state and the flags word come before cpu_user_regs.
_CTX_USER_REGS = 520
_CTX_CR3 = 4984 + 3 * 8
_CTX_FS_BASE = 5144
_CTX_GS_BASE_KERNEL = 5152
# cpu_user_regs (xen-x86_64.h): the 64-bit slots in order, error_code and
# entry_vector sharing slot 15; cs, ss and the data selectors are 16-bit.
_XEN_REGS = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    None,
    "rip",
    "cs",
    "rflags",
    "rsp",
    "ss",
    "es",
    "ds",
    "fs",
    "gs",
)
# Linux's user_regs_struct, which an x86_64 NT_PRSTATUS note carries.
_PRSTATUS_REGS = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "rflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)
_PRSTATUS_SIZE = 336
_PRSTATUS_REGS_OFFSET = 112
_PAGE = 4096
_PTE_PRESENT = 1
_PTE_LARGE = 1 << 7
_PTE_FRAME = ((1 << 52) - 1) & ~0xFFF
# PML4 slots 256-271 are Xen's own, present in every PV guest's tables.
_XEN_PML4_SLOTS = range(256, 272)
_INVALID = (1 << 64) - 1
# How many virtual addresses of one page a converted core keeps.
_MAX_ALIASES = 4
# ELF's e_phnum is 16 bits; 0xffff would mean "look in section header 0".
_MAX_SEGMENTS = 0xFFFE


def vcpu_registers(context: bytes) -> dict[str, int]:
    """The registers of one x86_64 vcpu_guest_context."""
    regs: dict[str, int] = {}
    for index, name in enumerate(_XEN_REGS):
        if name is None:
            continue
        (value,) = struct.unpack_from("<Q", context, _CTX_USER_REGS + 8 * index)
        # Selectors are 16 bits followed by padding or Xen's private bytes.
        regs[name] = (
            value & 0xFFFF if name in ("cs", "ss", "es", "ds", "fs", "gs") else (value)
        )
    regs["cr3"] = struct.unpack_from("<Q", context, _CTX_CR3)[0]
    regs["fs_base"] = struct.unpack_from("<Q", context, _CTX_FS_BASE)[0]
    regs["gs_base"] = struct.unpack_from("<Q", context, _CTX_GS_BASE_KERNEL)[0]
    return regs


def prstatus(vcpu: int, regs: dict[str, int]) -> bytes:
    """An NT_PRSTATUS descriptor for one vcpu; gdb shows vcpu N as thread N+1."""
    desc = bytearray(_PRSTATUS_SIZE)
    struct.pack_into("<i", desc, 32, vcpu + 1)
    values = [regs.get(name, 0) for name in _PRSTATUS_REGS]
    struct.pack_into(f"<{len(values)}Q", desc, _PRSTATUS_REGS_OFFSET, *values)
    return bytes(desc)


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    padded = [part + b"\0" * (-len(part) % 4) for part in (name, desc)]
    return struct.pack("<III", len(name), len(desc), kind) + b"".join(padded)


@dataclass
class XenCore:
    """A core written by `xl dump-core` of an x86_64 PV guest (no program headers;
    vcpu contexts, the pfn->mfn list and the pages in sections)."""

    data: bytes | memoryview
    contexts: list[bytes]
    page_of_mfn: dict[int, int]  # machine frame -> index in .xen_pages
    pages_offset: int

    @classmethod
    def parse(cls, handle, data) -> XenCore:
        """handle: the core file opened for reading; data: its bytes (an mmap)."""
        try:
            elf = ELFFile(handle)
            sections = {s.name: s for s in elf.iter_sections()}
        except (ELFError, ValueError, struct.error) as error:
            raise DebugError(f"the core is not an ELF file ({error}).") from None
        needed = (".xen_prstatus", ".xen_p2m", ".xen_pages")
        if elf["e_type"] != "ET_CORE" or any(n not in sections for n in needed):
            raise DebugError(
                "the core is not an `xl dump-core` of a PV guest (it lacks the "
                ".xen_prstatus, .xen_p2m or .xen_pages section); make it with "
                "`invoke core`."
            )
        if elf["e_machine"] != "EM_X86_64":
            raise DebugError("the core is of a 32-bit guest; pvlab reads x86_64 ones.")
        prstatus_section = sections[".xen_prstatus"]
        size = prstatus_section["sh_entsize"] or prstatus_section["sh_size"]
        raw = prstatus_section.data()
        contexts = [raw[i : i + size] for i in range(0, len(raw), size)]
        p2m = sections[".xen_p2m"].data()
        page_of_mfn = {}
        for index in range(len(p2m) // 16):
            pfn, mfn = struct.unpack_from("<QQ", p2m, 16 * index)
            if pfn != _INVALID:
                page_of_mfn[mfn] = index
        return cls(data, contexts, page_of_mfn, sections[".xen_pages"]["sh_offset"])

    def page(self, mfn: int) -> bytes | None:
        index = self.page_of_mfn.get(mfn)
        if index is None:
            return None
        start = self.pages_offset + index * _PAGE
        return bytes(self.data[start : start + _PAGE])

    def mappings(self, cr3: int) -> list[tuple[int, int, int]]:
        """(virtual address, machine frame, size) of each kernel page mapped by the
        page tables at cr3, in address order; Xen's slots are left out."""
        found: list[tuple[int, int, int]] = []

        def walk(mfn: int, level: int, base: int) -> None:
            table = self.page(mfn)
            if table is None:
                return
            span = 1 << (12 + 9 * level)
            entries = struct.unpack("<512Q", table)
            for slot, entry in enumerate(entries):
                if not entry & _PTE_PRESENT:
                    continue
                if level == 3 and slot in _XEN_PML4_SLOTS:
                    continue
                address = base + slot * span
                if level == 3 and address & (1 << 47):
                    address |= 0xFFFF << 48
                frame = (entry & _PTE_FRAME) >> 12
                if level == 0 or (level in (1, 2) and entry & _PTE_LARGE):
                    found.append((address, frame, span))
                else:
                    walk(frame, level - 1, address)

        walk(cr3 >> 12, 3, 0)
        return found

    def runs(self, cr3: int) -> list[tuple[int, list[int]]]:
        """Virtually contiguous runs of 4 KiB pages: (start, machine frames)."""
        runs: list[tuple[int, list[int]]] = []
        aliases: dict[int, int] = {}
        for address, frame, size in self.mappings(cr3):
            for i in range(size // _PAGE):
                page_address = address + i * _PAGE
                mfn = frame + i
                if mfn not in self.page_of_mfn:
                    continue
                # Linux maps a few pages thousands of times (the espfix stacks);
                # they would only bloat the core past ELF's 65535 segments.
                aliases[mfn] = aliases.get(mfn, 0) + 1
                if aliases[mfn] > _MAX_ALIASES:
                    continue
                if runs and runs[-1][0] + len(runs[-1][1]) * _PAGE == page_address:
                    runs[-1][1].append(mfn)
                else:
                    runs.append((page_address, [mfn]))
        return runs


def xen_core_to_elf(core_path: Path, out_path: Path) -> Path:
    """Rewrite a Xen dump-core as an ordinary ELF core that gdb reads: one PT_LOAD
    per virtually contiguous run of the kernel's mappings (vcpu 0's page tables)
    and one NT_PRSTATUS per vcpu."""
    with (
        core_path.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        core = XenCore.parse(handle, mapped)
        registers = [vcpu_registers(c) for c in core.contexts]
        if not registers:
            raise DebugError(f"{core_path} holds no vcpu state.")
        runs = core.runs(registers[0]["cr3"])
        if len(runs) + 1 > _MAX_SEGMENTS:
            raise DebugError(
                f"{core_path} maps its memory in {len(runs)} separate pieces, more "
                "than an ELF core can hold; open it with the crash utility instead."
            )
        notes = b"".join(
            _note(b"CORE", 1, prstatus(vcpu, regs))
            for vcpu, regs in enumerate(registers)
        )
        count = 1 + len(runs)
        header_size = 64 + 56 * count
        data_offset = header_size + len(notes)
        data_offset += -data_offset % _PAGE
        partial = out_path.with_name(out_path.name + ".part")
        with partial.open("wb") as out:
            ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
            out.write(
                ident
                + struct.pack(
                    "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, count, 0, 0, 0
                )
            )
            out.write(
                struct.pack("<IIQQQQQQ", 4, 0, header_size, 0, 0, len(notes), 0, 1)
            )
            offset = data_offset
            for start, frames in runs:
                size = len(frames) * _PAGE
                # PF_R | PF_W | PF_X: the core does not keep the page flags.
                out.write(
                    struct.pack("<IIQQQQQQ", 1, 7, offset, start, 0, size, size, _PAGE)
                )
                offset += size
            out.write(notes)
            out.write(b"\0" * (data_offset - header_size - len(notes)))
            for _, frames in runs:
                for mfn in frames:
                    out.write(core.page(mfn))
        os.replace(partial, out_path)
    return out_path


def open_core(
    core: Path, program: Path, ex: Sequence[str], batch: bool, progress: Progress
) -> int:
    """Open a core from `invoke core` in this host's gdb, with the kernel's symbols."""
    if not core.is_file():
        raise DebugError(
            f"core file {core} does not exist; make one with `invoke core`."
        )
    if shutil.which("gdb") is None:
        raise HostError("this host has no gdb; install the gdb package.")
    loaded = Program.load(program)
    with tempfile.TemporaryDirectory(prefix="pvlab-core-") as tmp:
        elf_core = Path(tmp) / "core.elf"
        progress(f"converting {core} into an ELF core gdb reads")
        xen_core_to_elf(core, elf_core)
        symbols = Path(tmp) / PROGRAM_NAME
        symbols.write_bytes(loaded.elf)
        commands = ["set pagination off", "set confirm off", *ex]
        argv = ["gdb", "-q", "-nx", *(["-batch"] if batch else [])]
        for command in commands:
            argv += ["-ex", command]
        argv += [str(symbols), str(elf_core)]
        return _call(argv)
