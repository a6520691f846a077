"""Inspect an AWS-style PV boot volume offline, as EC2's PV-GRUB would read it:
partition table or bare filesystem, menu.lst, and the kernel's ELF and Xen notes."""

from __future__ import annotations

import bz2
import io
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_NOTE_N_TYPE

from pvlab.errors import HostError, ImageError, SettingsError

log = logging.getLogger(__name__)

MENU_LST = "/boot/grub/menu.lst"
VARIANTS = ("auto", "hd0", "hd00")
# Same names as Settings.pvgrub_flavor. "legacy" is what EC2 runs: PV-GRUB built
# from GRUB 0.97 in Xen's stubdom tree.
FLAVORS = ("legacy", "pvgrub2")

# Xen copies a PV kernel's command line into start_info.cmd_line, 1024 bytes with
# its terminating NUL (MAX_GUEST_CMDLINE in xen/include/public/xen.h), and cuts
# the rest silently; GRUB 2's Xen loader uses the same buffer.
XEN_MAX_COMMAND_LINE = 1023
# GRUB 0.97 reads at most NEW_HEAPSIZE (1500) characters of a menu.lst line.
GRUB_LEGACY_MAX_LINE = 1500
# GRUB 0.97 gives up after this many symbolic links in one path (MAX_LINK_COUNT).
GRUB_LEGACY_MAX_LINKS = 5
# Upstream GRUB 0.97 reads only 128-byte inodes.
GRUB_LEGACY_INODE_SIZE = 128
# Partition types GRUB 0.97 mounts ext2 from (PC_SLICE_TYPE_EXT2FS, _LINUX_RAID).
GRUB_LEGACY_EXT2_PARTITION_TYPES = ("83", "fd")

# A kernel decompressing to more than this is not a kernel; stop before memory runs out.
MAX_KERNEL_SIZE = 512 * 1024 * 1024

_TOOLS = {
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "sfdisk": "fdisk",
    "blkid": "util-linux",
}

# GRUB 0.97's commands that take effect before the first title (BUILTIN_MENU).
_GLOBAL_COMMANDS = frozenset(
    (
        *("background", "bootp", "color", "default", "dhcp", "fallback"),
        *("foreground", "hiddenmenu", "ifconfig", "password", "rarp", "serial"),
        *("splashimage", "terminal", "terminfo", "tftpserver", "timeout"),
    )
)
# Of those, the ones GRUB 0.97 cannot run inside an entry (no BUILTIN_CMDLINE).
_MENU_ONLY_COMMANDS = frozenset(("default", "fallback", "hiddenmenu", "timeout"))
# Every other command GRUB 0.97 (with the Xen and distribution patches) knows;
# anything else is skipped without a word.
_KNOWN_COMMANDS = _GLOBAL_COMMANDS | frozenset(
    (
        *("blocklist", "boot", "cat", "chainloader", "clear", "cmp", "configfile"),
        *("debug", "device", "displayapm", "displaymem", "embed", "find", "fstest"),
        *("geometry", "gfxmenu", "halt", "help", "hide", "impsprobe", "initrd"),
        *("install", "ioprobe", "kernel", "lock", "makeactive", "map", "md5crypt"),
        *("module", "modulenounzip", "pager", "partnew", "parttype", "pause"),
        *("quit", "read", "reboot", "root", "rootnoverify", "savedefault", "setkey"),
        *("setup", "testload", "testvbe", "title", "unhide", "uppermem", "vbeprobe"),
    )
)
_DEVICE = re.compile(
    r"\((?P<drive>[a-z]+)(?P<number>\d*)(?:,(?P<part>\d+))?(?P<bsd>(?:,[a-h])?)\)"
)

# The bzImage payload's first bytes, in the order Xen's bzImage loader tries them.
_PAYLOAD_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00", "lzma"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21", "lz4"),
    (b"\x7fELF", "none"),
)
# The Xen release whose stubdom PV-GRUB first reads each bzImage payload
# compression (libxc's "unsafe" decompressors in 4.3, LZ4 in 4.4, zstd in 4.15).
_LEGACY_PAYLOAD_SINCE = {
    "bzip2": "4.3",
    "lzma": "4.3",
    "xz": "4.3",
    "lzo": "4.3",
    "lz4": "4.4",
    "zstd": "4.15",
}
# GRUB 2 decompresses through its file filters; pvlab's PV-GRUB 2 image loads
# gzio and xzio (GRUB also has lzopio, which the image does not load).
_PVGRUB2_PAYLOADS = ("none", "gzip", "xz")

# XEN_ELFNOTE_* types (xen/include/public/elfnote.h) and how their values read.
_XEN_NOTES = {
    0: ("INFO", "str"),
    1: ("ENTRY", "int"),
    2: ("HYPERCALL_PAGE", "int"),
    3: ("VIRT_BASE", "int"),
    4: ("PADDR_OFFSET", "int"),
    5: ("XEN_VERSION", "str"),
    6: ("GUEST_OS", "str"),
    7: ("GUEST_VERSION", "str"),
    8: ("LOADER", "str"),
    9: ("PAE_MODE", "str"),
    10: ("FEATURES", "str"),
    11: ("BSD_SYMTAB", "str"),
    12: ("HV_START_LOW", "int"),
    13: ("L1_MFN_VALID", "ints"),
    14: ("SUSPEND_CANCEL", "int"),
    15: ("INIT_P2M", "int"),
    16: ("MOD_START_PFN", "int"),
    17: ("SUPPORTED_FEATURES", "int"),
    18: ("PHYS32_ENTRY", "int"),
    19: ("PHYS32_RELOC", "ints"),
}
# Keys of the older "__xen_guest" string, named as the notes that replaced them.
_XEN_GUEST_KEYS = {
    "GUEST_OS": "GUEST_OS",
    "GUEST_VER": "GUEST_VERSION",
    "XEN_VER": "XEN_VERSION",
    "LOADER": "LOADER",
    "PAE": "PAE_MODE",
    "FEATURES": "FEATURES",
    "BSD_SYMTAB": "BSD_SYMTAB",
    "VIRT_BASE": "VIRT_BASE",
    "VIRT_ENTRY": "ENTRY",
    "ELF_PADDR_OFFSET": "PADDR_OFFSET",
    "HYPERCALL_PAGE": "HYPERCALL_PAGE",
}
_NUMERIC_GUEST_KEYS = frozenset(
    ("VIRT_BASE", "ENTRY", "PADDR_OFFSET", "HYPERCALL_PAGE")
)
_NOTE_TYPE_NUMBERS = {
    name: value for name, value in ENUM_NOTE_N_TYPE.items() if isinstance(value, int)
}


@dataclass(frozen=True)
class Finding:
    """One thing about a boot volume that would stop or change its boot on EC2."""

    severity: str  # "error" (would not boot as meant) or "warning"
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass(frozen=True)
class Partition:
    """One entry of the volume's partition table; start and size in bytes."""

    number: int
    start: int
    size: int
    type: str


# ---------------------------------------------------------------------------
# menu.lst


@dataclass(frozen=True)
class MenuProblem:
    """A menu.lst line GRUB reads differently from how it looks."""

    line: int
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


@dataclass(frozen=True)
class MenuCommand:
    name: str
    args: str
    line: int


@dataclass(frozen=True)
class FileLine:
    """A kernel or initrd line: the file, the device it is read from, its arguments."""

    path: str
    device: str | None  # "(hd0)" as written before the path, if it was
    root: str | None  # the root device in effect when the line runs
    args: str
    line: int

    @property
    def effective_device(self) -> str | None:
        return self.device or self.root

    @property
    def command_line(self) -> str:
        """What the kernel receives: everything after the file name."""
        return self.args


@dataclass(frozen=True)
class MenuEntry:
    title: str
    line: int
    commands: tuple[MenuCommand, ...]

    @property
    def root(self) -> str | None:
        """The last root device the entry sets, e.g. "(hd0)"."""
        roots = [c.args.split()[0] for c in self.commands if _is_root(c)]
        return roots[-1] if roots else None

    @property
    def kernel(self) -> FileLine | None:
        return self._file_line("kernel")

    @property
    def menu_only_commands(self) -> tuple[MenuCommand, ...]:
        """Commands such as timeout that GRUB 0.97 cannot run inside an entry."""
        return tuple(c for c in self.commands if c.name in _MENU_ONLY_COMMANDS)

    @property
    def initrd(self) -> FileLine | None:
        return self._file_line("initrd")

    def _file_line(self, name: str) -> FileLine | None:
        root = found = None
        for command in self.commands:
            if _is_root(command):
                root = command.args.split()[0]
            elif command.name == name:
                found = (command, root)
        if found is None:
            return None
        command, root = found
        words = command.args
        # GRUB's kernel command takes --type=... and --no-mem-option first.
        while name == "kernel" and words.startswith("--"):
            words = _skip_to(words, after_equal=False)
        target = words.split(" ", 1)[0]
        device = None
        match = _DEVICE.match(target)
        if match:
            device, target = match.group(0), target[match.end() :]
        return FileLine(
            path=target,
            device=device,
            root=root,
            args=_skip_to(words, after_equal=False),
            line=command.line,
        )


def _is_root(command: MenuCommand) -> bool:
    return command.name in ("root", "rootnoverify") and bool(command.args.split())


@dataclass(frozen=True)
class MenuLst:
    """A menu.lst as GRUB 0.97 reads it (stage2/stage2.c, cmain)."""

    entries: tuple[MenuEntry, ...]
    default: int = 0
    default_is_saved: bool = False
    fallback: tuple[int, ...] = ()
    timeout: int | None = None
    is_menu_hidden: bool = False
    # Lines GRUB ignores, cannot run or does not count.
    problems: tuple[MenuProblem, ...] = ()
    # Numbers of lines longer than GRUB reads.
    cut_lines: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str | bytes) -> MenuLst:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        entries: list[MenuEntry] = []
        problems: list[MenuProblem] = []
        cut: list[int] = []
        settings: dict = {"default": 0, "saved": False, "fallback": (), "timeout": None}
        hidden = False
        title: tuple[str, int] | None = None
        commands: list[MenuCommand] = []

        def close_entry() -> None:
            if title is None:
                return
            if commands:
                entries.append(MenuEntry(title[0], title[1], tuple(commands)))
            else:
                problems.append(
                    MenuProblem(
                        title[1],
                        f"title '{title[0]}' has no commands, so GRUB does not "
                        "count it as an entry",
                    )
                )

        for number, line, was_cut in _config_lines(text):
            if was_cut:
                cut.append(number)
            name = re.split(r"[ =]", line, maxsplit=1)[0]
            args = _skip_to(line, after_equal=True)
            if name not in _KNOWN_COMMANDS:
                problems.append(
                    MenuProblem(number, f"GRUB skips the unknown command '{name}'")
                )
                continue
            if name == "title":
                close_entry()
                title, commands = (args.rstrip(), number), []
            elif title is None:
                if name not in _GLOBAL_COMMANDS:
                    problems.append(
                        MenuProblem(
                            number, f"GRUB ignores '{name}' before the first title"
                        )
                    )
                elif name == "hiddenmenu":
                    hidden = True
                elif name in settings:
                    _apply_global(name, args, number, settings, problems)
            else:
                if name in _MENU_ONLY_COMMANDS:
                    problems.append(
                        MenuProblem(
                            number,
                            f"'{name}' belongs above the first title; inside an "
                            "entry GRUB legacy stops that entry with 'Error 27: "
                            "Unrecognized command'",
                        )
                    )
                commands.append(MenuCommand(name, args, number))
        close_entry()
        return cls(
            entries=tuple(entries),
            default=settings["default"],
            default_is_saved=settings["saved"],
            fallback=settings["fallback"],
            timeout=settings["timeout"],
            is_menu_hidden=hidden,
            problems=tuple(problems),
            cut_lines=tuple(cut),
        )

    @property
    def default_index(self) -> int | None:
        """The entry GRUB boots: default, else the first valid fallback, else 0."""
        if not self.entries:
            return None
        count = len(self.entries)
        if self.default < count:
            return self.default
        fallbacks = [entry for entry in self.fallback if entry < count]
        return fallbacks[0] if fallbacks else 0

    @property
    def default_entry(self) -> MenuEntry | None:
        index = self.default_index
        return None if index is None else self.entries[index]


def _config_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, command line, was cut) as get_line_from_config reads them.

    GRUB drops carriage returns, reads tabs as spaces, joins a line ending in a
    backslash with the next, skips leading blanks, and treats '#' as a comment
    only as the first character of a line.
    """
    buffer: list[str] = []
    literal = comment = was_cut = False
    number = start = 1
    for c in text:
        if c == "\r":
            continue
        if c == "\t":
            c = " "
        if literal:
            if c == "\n":
                c = " "
                number += 1
                if buffer:
                    buffer.pop()
            literal = False
        if c == "\\":
            literal = True
        if comment:
            if c == "\n":
                comment = False
                number += 1
        elif not buffer:
            if c == "#":
                comment = True
            elif c == "\n":
                number += 1
            elif c != " ":
                buffer.append(c)
                start = number
        elif c == "\n":
            yield start, "".join(buffer), was_cut
            buffer, was_cut, literal = [], False, False
            number += 1
        elif len(buffer) < GRUB_LEGACY_MAX_LINE:
            buffer.append(c)
        else:
            was_cut = True
    if buffer:
        yield start, "".join(buffer), was_cut


def _skip_to(text: str, after_equal: bool) -> str:
    """GRUB's skip_to: past the first word, then past blanks (and '=' if asked)."""
    stops = " =" if after_equal else " "
    index = 0
    while index < len(text) and text[index] not in stops:
        index += 1
    while index < len(text) and text[index] in stops:
        index += 1
    return text[index:]


def _apply_global(
    name: str, args: str, number: int, settings: dict, problems: list[MenuProblem]
) -> None:
    words = args.split()
    if name == "default" and words[:1] == ["saved"]:
        # PV-GRUB has no /boot/grub/default to read: its saved entry is 0.
        settings["default"], settings["saved"] = 0, True
        return
    values = []
    for word in words if name == "fallback" else words[:1]:
        value = _grub_int(word)
        if value is None:
            break
        values.append(value)
    if not values:
        problems.append(MenuProblem(number, f"GRUB ignores '{name}' without a number"))
    elif name == "fallback":
        settings["fallback"] = tuple(values)
    else:
        settings[name] = values[0]


def _grub_int(word: str) -> int | None:
    """GRUB's safe_parse_maxint: decimal, or hexadecimal after 0x."""
    try:
        return int(word, 16) if word.lower().startswith("0x") else int(word, 10)
    except ValueError:
        return None


def parse_device(device: str) -> tuple[str, int | None, str] | None:
    """("hd0", None, "") for "(hd0)", ("hd0", 0, "") for "(hd0,0)", else None."""
    match = _DEVICE.fullmatch(device)
    if not match:
        return None
    part = match.group("part")
    return (
        match.group("drive") + match.group("number"),
        None if part is None else int(part),
        match.group("bsd").lstrip(","),
    )


# ---------------------------------------------------------------------------
# Kernel


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header."""

    vaddr: int
    paddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class Kernel:
    """What a loader learns from a kernel file: its wrapping and its ELF image."""

    format: str  # "elf", "bzimage" or "unknown"
    wrapper: str | None = None  # compression of the whole file: "gzip", "xz"
    compression: str | None = None  # a bzImage payload's: "gzip" ... "none"
    boot_protocol: tuple[int, int] | None = None  # a bzImage's, e.g. (2, 15)
    problem: str | None = None  # why the ELF image could not be read
    elf_class: int | None = None  # 32 or 64
    machine: str | None = None  # e.g. "EM_X86_64"
    elf_type: str | None = None
    entry: int | None = None
    build_id: str | None = None
    loadable_segments: tuple[Segment, ...] = ()
    xen_notes: dict[str, object] = field(default_factory=dict, hash=False)
    xen_notes_source: str | None = None  # "notes" or "__xen_guest"

    @classmethod
    def from_bytes(cls, data: bytes) -> Kernel:
        wrapper = None
        if data.startswith(b"\x1f\x8b"):
            wrapper = "gzip"
        elif data.startswith(b"\xfd7zXZ\x00"):
            wrapper = "xz"
        if wrapper:
            try:
                data = _decompress(wrapper, data)
            except ValueError as error:
                return cls("unknown", wrapper=wrapper, problem=str(error))
        if data.startswith(b"\x7fELF"):
            return _elf_kernel(data, format="elf", wrapper=wrapper)
        if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
            return _bzimage_kernel(data, wrapper)
        what = "a gzip-compressed file" if wrapper == "gzip" else "a file"
        return cls(
            "unknown",
            wrapper=wrapper,
            problem=f"{what} that is neither an ELF image nor a Linux bzImage",
        )

    @property
    def has_elf(self) -> bool:
        return self.elf_class is not None

    @property
    def is_x86_64(self) -> bool:
        return self.elf_class == 64 and self.machine == "EM_X86_64"

    @property
    def has_xen_notes(self) -> bool:
        return self.xen_notes_source is not None

    @property
    def description(self) -> str:
        """E.g. "bzImage with an xz payload" or "gzip-compressed ELF"."""
        if self.format == "bzimage":
            inner = "an uncompressed" if self.compression == "none" else None
            text = f"bzImage with {inner or _article(self.compression)} payload"
        elif self.format == "elf":
            text = "ELF"
        else:
            text = "unrecognised file"
        return f"{self.wrapper}-compressed {text}" if self.wrapper else text


def _article(word: str | None) -> str:
    word = word or "unknown"
    return f"{'an' if word[0] in 'aeiouxl' else 'a'} {word}"


@lru_cache(maxsize=4)
def _decompress(kind: str, data: bytes) -> bytes:
    """One stream of gzip, xz, lzma or bzip2, ignoring what follows it.

    Linux appends the uncompressed size to a bzImage payload, so trailing bytes
    are normal. Remembered: a boot checks the kernel, identifies it and locates its
    entry, and unpacking an xz kernel takes over half a second each time.
    """
    if kind == "gzip":
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        errors: tuple[type[Exception], ...] = (zlib.error,)
    elif kind == "bzip2":
        decoder, errors = bz2.BZ2Decompressor(), (OSError, ValueError)
    elif kind in ("xz", "lzma"):
        container = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        decoder, errors = lzma.LZMADecompressor(container), (lzma.LZMAError,)
    else:
        raise ValueError(f"pvlab cannot decompress {kind}")
    try:
        result = decoder.decompress(data, MAX_KERNEL_SIZE)
    except errors as error:
        raise ValueError(f"its {kind} data is corrupt ({error})") from error
    if len(result) >= MAX_KERNEL_SIZE:
        raise ValueError(
            f"its {kind} data unpacks to more than {MAX_KERNEL_SIZE >> 20} MiB"
        )
    if not decoder.eof:
        raise ValueError(f"its {kind} data is cut short")
    return result


def _bzimage_kernel(data: bytes, wrapper: str | None) -> Kernel:
    """Find the ELF image a bzImage carries (boot protocol 2.08 and later).

    The payload starts (setup_sects + 1) * 512 + payload_offset bytes into the
    file, as Xen's bzImage loader and GRUB 2's Xen loader compute it.
    """
    version = struct.unpack_from("<H", data, 0x206)[0]
    protocol = (version >> 8, version & 0xFF)
    if version < 0x208:
        return Kernel(
            "bzimage",
            wrapper=wrapper,
            boot_protocol=protocol,
            problem=f"its boot protocol {protocol[0]}.{protocol[1]:02d} is older than "
            "2.08, so it carries no ELF image for Xen to load",
        )
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if start >= len(data) or len(payload) < payload_length:
        return Kernel(
            "bzimage",
            wrapper=wrapper,
            boot_protocol=protocol,
            problem="its payload lies beyond the end of the file",
        )
    compression = next(
        (name for magic, name in _PAYLOAD_MAGICS if payload.startswith(magic)), None
    )
    base = {"format": "bzimage", "wrapper": wrapper, "boot_protocol": protocol}
    if compression is None:
        return Kernel(
            **base, problem="its payload is in no compression format Linux uses"
        )
    if compression != "none":
        try:
            payload = _decompress(compression, payload)
        except ValueError as error:
            return Kernel(**base, compression=compression, problem=str(error))
    if not payload.startswith(b"\x7fELF"):
        return Kernel(
            **base, compression=compression, problem="its payload is not an ELF image"
        )
    return _elf_kernel(payload, compression=compression, **base)


def _elf_kernel(data: bytes, **known) -> Kernel:
    try:
        elf = ELFFile(io.BytesIO(data))
        segments = list(elf.iter_segments())
        loadable = tuple(
            Segment(
                vaddr=s["p_vaddr"],
                paddr=s["p_paddr"],
                offset=s["p_offset"],
                filesz=s["p_filesz"],
                memsz=s["p_memsz"],
                flags=s["p_flags"],
            )
            for s in segments
            if s["p_type"] == "PT_LOAD"
        )
        notes = list(_elf_notes(elf, segments))
        xen_notes, source = _xen_notes(elf, notes)
    except (ELFError, ConstructError, struct.error, ValueError, OSError) as error:
        return Kernel(problem=f"its ELF image is damaged ({error})", **known)
    build_ids = [
        desc.hex() for name, kind, desc in notes if name == "GNU" and kind == 3
    ]
    return Kernel(
        elf_class=elf.elfclass,
        machine=elf["e_machine"],
        elf_type=elf["e_type"],
        entry=elf["e_entry"],
        build_id=build_ids[0] if build_ids else None,
        loadable_segments=loadable,
        xen_notes=xen_notes,
        xen_notes_source=source,
        **known,
    )


def _elf_notes(elf: ELFFile, segments: list) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, descriptor) of every note, from PT_NOTE or else SHT_NOTE."""
    containers = [s for s in segments if s["p_type"] == "PT_NOTE"]
    if not containers:
        containers = [s for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"]
    for container in containers:
        for note in container.iter_notes():
            kind = note["n_type"]
            # pyelftools names types by the GNU table whatever the owner;
            # the number is what counts for "Xen" notes.
            number = (
                _NOTE_TYPE_NUMBERS.get(kind, kind) if isinstance(kind, str) else kind
            )
            yield note["n_name"] or "", int(number), bytes(note["n_descdata"])


def _xen_notes(elf: ELFFile, notes: list) -> tuple[dict[str, object], str | None]:
    """The Xen notes the way Xen's libelf finds them: notes first, then __xen_guest."""
    values: dict[str, object] = {}
    for name, kind, desc in notes:
        if name != "Xen":
            continue
        key, style = _XEN_NOTES.get(kind, (f"TYPE_{kind}", "bytes"))
        if style == "str":
            values[key] = desc.split(b"\0", 1)[0].decode("ascii", errors="replace")
        elif style == "int" and len(desc) in (1, 2, 4, 8):
            values[key] = int.from_bytes(desc, "little")
        elif style == "ints" and len(desc) % 8 == 0:
            values[key] = tuple(
                int.from_bytes(desc[i : i + 8], "little")
                for i in range(0, len(desc), 8)
            )
        else:
            values[key] = desc
    if values:
        return values, "notes"
    section = elf.get_section_by_name("__xen_guest")
    if section is None:
        return {}, None
    text = section.data().split(b"\0", 1)[0].decode("ascii", errors="replace")
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = _XEN_GUEST_KEYS.get(key.strip(), key.strip())
        try:
            values[key] = int(value, 0) if key in _NUMERIC_GUEST_KEYS else value
        except ValueError:
            values[key] = value
    return values, "__xen_guest"


# ---------------------------------------------------------------------------
# The boot volume


class BootVolume:
    """A raw boot volume image, read without mounting: layout, filesystem, files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        problem = _path_problem(self.path)
        if problem:
            raise ImageError(f"{problem}.")

    def __repr__(self) -> str:
        return f"BootVolume({str(self.path)!r})"

    @property
    def size(self) -> int:
        with self.path.open("rb") as handle:
            return handle.seek(0, os.SEEK_END)

    @cached_property
    def _table(self) -> dict | None:
        result = _run(["sfdisk", "--json", str(self.path)])
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)["partitiontable"]
        except (ValueError, KeyError):
            return None

    @property
    def has_partition_table(self) -> bool:
        return self._table is not None

    @property
    def partition_table_type(self) -> str | None:
        """The table's label, "dos" (MBR) or "gpt"; None for a bare filesystem."""
        return None if self._table is None else self._table.get("label")

    @cached_property
    def partitions(self) -> tuple[Partition, ...]:
        if self._table is None:
            return ()
        sector = int(self._table.get("sectorsize", 512))
        partitions = []
        for entry in self._table.get("partitions", []):
            digits = re.search(r"(\d+)$", entry.get("node", ""))
            partitions.append(
                Partition(
                    number=int(digits.group(1)) if digits else len(partitions) + 1,
                    start=int(entry["start"]) * sector,
                    size=int(entry["size"]) * sector,
                    type=str(entry.get("type", "")).lower(),
                )
            )
        return tuple(sorted(partitions, key=lambda p: p.number))

    @property
    def first_partition(self) -> Partition | None:
        """Partition 1, which PV-GRUB reads as (hd0,0)."""
        return next((p for p in self.partitions if p.number == 1), None)

    @property
    def partition_offset(self) -> int | None:
        """The byte offset of the first partition; None for a bare filesystem."""
        partition = self.first_partition
        return None if partition is None else partition.start

    @property
    def filesystem_offset(self) -> int:
        """Where the filesystem PV-GRUB reads starts: 0, or the first partition."""
        return self.partition_offset or 0

    @property
    def layout(self) -> str:
        """The PV-GRUB variant it needs: "hd00" if partitioned, else "hd0"."""
        return "hd00" if self.has_partition_table else "hd0"

    @cached_property
    def filesystem_type(self) -> str | None:
        """What blkid finds where PV-GRUB looks, e.g. "ext2", "xfs"; None if nothing."""
        if self.has_partition_table and self.first_partition is None:
            return None
        result = _run(
            [
                "blkid",
                "-p",
                "-o",
                "export",
                "--offset",
                str(self.filesystem_offset),
                str(self.path),
            ]
        )
        fields = dict(
            line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
        )
        return fields.get("TYPE")

    @property
    def is_ext_filesystem(self) -> bool:
        return self.filesystem_type in ("ext2", "ext3", "ext4")

    @cached_property
    def _superblock(self) -> dict[str, str]:
        if not self.is_ext_filesystem:
            return {}
        result = _run(["dumpe2fs", "-h", self._target])
        fields = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    @property
    def filesystem_features(self) -> frozenset[str]:
        return frozenset(self._superblock.get("Filesystem features", "").split())

    @property
    def inode_size(self) -> int | None:
        if not self._superblock:
            return None
        # Revision 0 filesystems have no such field: their inodes are 128 bytes.
        return int(self._superblock.get("Inode size", GRUB_LEGACY_INODE_SIZE))

    @property
    def _target(self) -> str:
        offset = self.filesystem_offset
        # Limitation: e2fsprogs reads "?offset=" from the name, so an image path
        # with a "?" in it cannot be read at an offset.
        return f"{self.path}?offset={offset}" if offset else str(self.path)

    def file_type(self, path: str) -> str | None:
        """The type of a path ("regular", "directory", "symlink"...), not followed."""
        found = self._stat(path)
        return None if found is None else found[0]

    def exists(self, path: str) -> bool:
        return self._resolve(path) is not None

    def read_file(self, path: str) -> bytes:
        """A file's contents, following symbolic links as GRUB 0.97 does."""
        resolved = self._resolve(path)
        if resolved is None:
            raise FileNotFoundError(f"{path} is not in {self.path}")
        kind, real = resolved
        if kind == "directory":
            raise IsADirectoryError(f"{path} is a directory in {self.path}")
        result = _run(["debugfs", "-R", f'cat "{real}"', self._target], text=False)
        if result.returncode != 0:
            raise ImageError(
                f"debugfs could not read {path} from {self.path}; check that the "
                "image is not damaged (e2fsck -n)."
            )
        return result.stdout

    @cached_property
    def menu_lst(self) -> MenuLst | None:
        """/boot/grub/menu.lst parsed, None if it cannot be read."""
        try:
            return MenuLst.parse(self.read_file(MENU_LST))
        except (OSError, ImageError):
            return None

    @property
    def kernel_path(self) -> str | None:
        """The kernel file of menu.lst's default entry, without a device."""
        entry = self.menu_lst.default_entry if self.menu_lst else None
        kernel = entry.kernel if entry else None
        return kernel.path if kernel else None

    @cached_property
    def kernel(self) -> Kernel | None:
        path = self.kernel_path
        if not path:
            return None
        try:
            return Kernel.from_bytes(self.read_file(path))
        except (OSError, ImageError):
            return None

    def _stat(self, path: str) -> tuple[str, str | None] | None:
        """(type, fast symlink target) of a path, None if it does not exist."""
        if not self.is_ext_filesystem:
            raise ImageError(
                f"{self.path} holds no ext2/3/4 filesystem at byte "
                f"{self.filesystem_offset}; pvlab reads only those."
            )
        if '"' in path or "\n" in path:
            return None
        result = _run(["debugfs", "-R", f'stat "{path}"', self._target])
        kind = re.search(r"Type: (\S+)", result.stdout)
        if kind is None:
            return None
        link = re.search(r'Fast link dest: "(.*)"', result.stdout)
        return kind.group(1), link.group(1) if link else None

    def _resolve(self, path: str) -> tuple[str, str] | None:
        """(type, path) after following symbolic links at the end of the path."""
        path = posixpath.normpath("/" + path.lstrip("/"))
        for _ in range(GRUB_LEGACY_MAX_LINKS + 1):
            found = self._stat(path)
            if found is None:
                return None
            kind, fast_target = found
            if kind != "symlink":
                return kind, path
            target = fast_target
            if target is None:
                result = _run(["debugfs", "-R", f'cat "{path}"', self._target])
                target = result.stdout
            # An absolute target starts at the root of this filesystem.
            base = "/" if target.startswith("/") else posixpath.dirname(path)
            path = posixpath.normpath(posixpath.join(base, target))
        return None


def _path_problem(path: Path) -> str | None:
    """Why a path cannot be a boot volume image, or None."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"boot volume {path} does not exist; give the path of the raw image"
    except OSError as error:
        return f"boot volume {path} cannot be read ({error.strerror}); check its path"
    if stat.S_ISDIR(info.st_mode):
        return (
            f"boot volume {path} is a directory; give the raw image file "
            "(the volume as EC2 attaches it), not the folder it is in"
        )
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        return f"boot volume {path} is not a file; give the raw image file"
    if not os.access(path, os.R_OK):
        return f"boot volume {path} is not readable; fix its permissions"
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        return f"boot volume {path} is empty (0 bytes); build or copy the image again"
    return None


def _run(command: list[str], text: bool = True) -> subprocess.CompletedProcess:
    tool = command[0]
    if shutil.which(tool) is None:
        raise HostError(
            f"the host lacks {tool}, needed to read boot volumes; install "
            f"{_TOOLS.get(tool, tool)}."
        )
    log.debug("running %s", " ".join(command))
    # debugfs would page long output through $PAGER.
    env = {**os.environ, "DEBUGFS_PAGER": "__none__"}
    return subprocess.run(command, capture_output=True, text=text, check=False, env=env)


# ---------------------------------------------------------------------------
# The checks


def pick_variant(volume: BootVolume) -> str:
    """The PV-GRUB variant EC2 needs for a volume: hd00 if partitioned, else hd0."""
    return volume.layout


def check(
    path: str | os.PathLike, variant: str = "auto", flavor: str = "legacy"
) -> list[Finding]:
    """Everything that would stop EC2's PV-GRUB from booting the image as meant.

    variant is the PV-GRUB variant the image will be booted with ("auto" picks
    it from the layout); flavor is "legacy" (GRUB 0.97, what EC2 runs) or
    "pvgrub2" (GRUB 2's Xen port). Only the entry PV-GRUB boots is checked.
    """
    if variant not in VARIANTS:
        raise SettingsError(
            f"unknown PV-GRUB variant {variant!r}; use one of {', '.join(VARIANTS)}."
        )
    if flavor not in FLAVORS:
        raise SettingsError(
            f"unknown PV-GRUB flavor {flavor!r}; use one of {', '.join(FLAVORS)}."
        )
    image = Path(path)
    problem = _path_problem(image)
    if problem:
        return [Finding("error", problem + ".")]
    volume = BootVolume(image)
    log.info("checking boot volume %s for %s PV-GRUB", image, flavor)
    return _Checker(volume, variant, flavor).run()


class _Checker:
    def __init__(self, volume: BootVolume, variant: str, flavor: str) -> None:
        self.volume = volume
        self.image = volume.path
        self.variant = variant
        self.legacy = flavor == "legacy"
        self.findings: list[Finding] = []

    def error(self, message: str) -> None:
        self.findings.append(Finding("error", message))

    def warning(self, message: str) -> None:
        self.findings.append(Finding("warning", message))

    def run(self) -> list[Finding]:
        if self.check_layout() and self.check_filesystem():
            menu = self.check_menu()
            entry = menu and self.check_entry(menu)
            if entry:
                self.check_kernel(entry)
        return self.findings

    def check_layout(self) -> bool:
        volume, image = self.volume, self.image
        if volume.has_partition_table:
            table = volume.partition_table_type
            first = volume.first_partition
            if self.variant == "hd0":
                where = f", first partition at byte {first.start}" if first else ""
                self.error(
                    f"{image} is partitioned ({table} table{where}) but variant hd0 "
                    "was asked: EC2's hd0 PV-GRUB reads (hd0)/boot/grub/menu.lst from "
                    "the start of the volume, finds a partition table instead of a "
                    "filesystem and the instance fails to boot; use variant hd00 "
                    "(pv-grub-hd00) or auto."
                )
            if table != "dos":
                self.error(
                    f"{image} has a {table} partition table; PV-GRUB finds (hd0,0) "
                    "only through an MBR (GRUB legacy knows no GPT, pvlab's PV-GRUB 2 "
                    "loads only part_msdos); repartition with an MBR (sfdisk label: "
                    "dos) or write a bare filesystem."
                )
                return False
            if first is None:
                self.error(
                    f"{image} has an MBR without a partition 1, which PV-GRUB reads "
                    "as (hd0,0); create one partition holding the filesystem."
                )
                return False
            if self.legacy and first.type not in GRUB_LEGACY_EXT2_PARTITION_TYPES:
                self.error(
                    f"{image}: partition 1 has type {first.type}; GRUB legacy mounts "
                    "ext2/3/4 only from partitions of type 83 (Linux), so PV-GRUB "
                    "cannot read it; change the type with 'sfdisk --part-type IMAGE "
                    "1 83'."
                )
        elif self.variant == "hd00":
            kind = volume.filesystem_type or "unpartitioned"
            self.error(
                f"{image} is a bare {kind} filesystem without a partition table but "
                "variant hd00 was asked: EC2's hd00 PV-GRUB reads "
                "(hd0,0)/boot/grub/menu.lst from the first partition, finds no "
                "partition table and the instance fails to boot; use variant hd0 "
                "(pv-grub-hd0) or auto."
            )
        return True

    def check_filesystem(self) -> bool:
        volume, image = self.volume, self.image
        kind = volume.filesystem_type
        where = "in partition 1" if volume.has_partition_table else "at the start"
        if kind is None:
            self.error(
                f"{image} holds no filesystem {where} (no ext2/3/4 superblock was "
                "found); write the boot volume with mke2fs (ext2, -I 128, as UniK "
                "does) or check that this is the raw volume image."
            )
            return False
        if not volume.is_ext_filesystem:
            self.error(
                f"{image} holds a {kind} filesystem {where}; pvlab reads and boots "
                "only ext2/3/4 boot volumes (its PV-GRUB 2 image loads only the ext2 "
                "module); rebuild the volume as ext2."
            )
            return False
        features = volume.filesystem_features
        if self.legacy and "64bit" in features:
            self.error(
                f"{image}: the {kind} filesystem has the 64bit feature; GRUB "
                "legacy's ext4 support (Xen's 60ext4 patch) refuses its group "
                "descriptors, so PV-GRUB cannot read any file; recreate it with "
                "mke2fs -O ^64bit (or as ext2)."
            )
        if "inline_data" in features:
            self.error(
                f"{image}: the {kind} filesystem has the inline_data feature, which "
                "neither GRUB legacy nor GRUB 2 reads; recreate it without "
                "(mke2fs -O ^inline_data)."
            )
        inode_size = volume.inode_size
        if self.legacy and inode_size and inode_size > GRUB_LEGACY_INODE_SIZE:
            self.warning(
                f"{image}: the {kind} filesystem has {inode_size}-byte inodes; "
                "upstream GRUB 0.97 reads only 128-byte ones (Xen's PV-GRUB and "
                "EC2's carry a patch for larger ones); recreate it with mke2fs "
                "-I 128, as UniK does, to boot under any GRUB legacy."
            )
        return True

    def check_menu(self) -> MenuLst | None:
        volume, image = self.volume, self.image
        if not volume.exists(MENU_LST):
            hint = (
                "; /boot/grub/grub.conf exists: link menu.lst to it"
                if volume.exists("/boot/grub/grub.conf")
                else ""
            )
            self.error(
                f"{image}: {MENU_LST} is missing (or a broken link), and PV-GRUB "
                f"reads its menu from there{hint}; add a menu.lst with a title, a "
                "root and a kernel line."
            )
            return None
        try:
            data = volume.read_file(MENU_LST)
        except IsADirectoryError:
            self.error(
                f"{image}: {MENU_LST} is a directory; replace it with the GRUB "
                "legacy menu file."
            )
            return None
        if b"\0" in data:
            self.error(
                f"{image}: {MENU_LST} is not a text file (it holds NUL bytes); "
                "write it as plain text with title, root and kernel lines."
            )
            return None
        menu = MenuLst.parse(data)
        stopping: set[int] = set()
        if self.legacy and menu.entries:
            # These stop the entry that boots; check_entry reports them as errors.
            stopping = {c.line for c in menu.default_entry.menu_only_commands}
        for problem in menu.problems:
            if problem.line not in stopping:
                self.warning(f"{image}: {MENU_LST} {problem}.")
        if not menu.entries:
            self.error(
                f"{image}: {MENU_LST} has no boot entry (a title followed by "
                "commands), so PV-GRUB stops at its grub> prompt; add a title with "
                "root, kernel and initrd lines."
            )
            return None
        if menu.default >= len(menu.entries):
            chosen = menu.default_entry
            self.warning(
                f"{image}: {MENU_LST} sets default {menu.default} but has only "
                f"{len(menu.entries)} entries, so GRUB boots entry "
                f"{menu.default_index} ('{chosen.title}'); fix the default line."
            )
        return menu

    def check_entry(self, menu: MenuLst) -> MenuEntry | None:
        image = self.image
        entry = menu.default_entry
        name = f"{MENU_LST} entry '{entry.title}' (line {entry.line})"
        kernel = entry.kernel
        if kernel is None or not kernel.path:
            self.error(
                f"{image}: {name}, the one PV-GRUB boots, has no kernel line; add "
                "'kernel /boot/vmlinuz ARGS' under its title."
            )
            return None
        for line in menu.cut_lines:
            if line == kernel.line:
                self.error(
                    f"{image}: line {line} of {MENU_LST} is longer than the "
                    f"{GRUB_LEGACY_MAX_LINE} characters GRUB legacy reads, so the "
                    "kernel line is cut; shorten it."
                )
        if self.legacy:
            for command in entry.menu_only_commands:
                self.error(
                    f"{image}: {name} has '{command.name}' on line {command.line}, "
                    "which GRUB legacy runs only above the first title: booting the "
                    "entry stops with 'Error 27: Unrecognized command'; move it up."
                )
        if not self.check_devices(entry, name):
            return None
        for line in (kernel, entry.initrd):
            if line and line.path and not line.path.startswith("/"):
                self.error(
                    f"{image}: line {line.line} of {MENU_LST} names {line.path}, "
                    "but GRUB needs a path from the filesystem's root; write "
                    f"/{line.path.lstrip('/')} (or the path it really has)."
                )
                return None
        length = len(kernel.command_line.encode())
        if length > XEN_MAX_COMMAND_LINE:
            self.error(
                f"{image}: the kernel command line of {name} is {length} characters "
                f"but Xen passes at most {XEN_MAX_COMMAND_LINE} to a PV kernel "
                "(start_info.cmd_line) and drops the rest; shorten it."
            )
        initrd = entry.initrd
        if initrd and initrd.path and not self.volume.exists(initrd.path):
            self.error(
                f"{image}: the initrd {initrd.path} named on line {initrd.line} of "
                f"{MENU_LST} is not in the filesystem, so PV-GRUB stops with 'file "
                "not found'; fix the path or remove the initrd line."
            )
        return entry

    def check_devices(self, entry: MenuEntry, name: str) -> bool:
        """Each file of the entry must be read from the device the layout has."""
        image, layout = self.image, self.volume.layout
        expected = "(hd0)" if layout == "hd0" else "(hd0,0)"
        wanted = parse_device(expected)
        how = "bare filesystem" if layout == "hd0" else "partitioned volume"
        good = True
        root = entry.root
        if root is not None and parse_device(root) != wanted:
            self.error(
                f"{image}: {name} sets root {root} but this is a {how}, which "
                f"PV-GRUB reads as {expected}; write 'root {expected}'."
            )
            good = False
        for line in (entry.kernel, entry.initrd):
            if line is None or line.device is None:
                continue
            if parse_device(line.device) != wanted:
                self.error(
                    f"{image}: line {line.line} of {MENU_LST} reads "
                    f"{line.device}{line.path} but this is a {how}, which PV-GRUB "
                    f"reads as {expected}; write {expected}{line.path} or drop the "
                    "device."
                )
                good = False
        kernel = entry.kernel
        if good and kernel.effective_device is None:
            text = (
                f"{image}: {name} has no root line and its kernel path names no device"
            )
            if self.legacy:
                self.error(
                    f"{text}; GRUB legacy PV-GRUB then looks on its network drive "
                    f"and fails; add 'root {expected}' before the kernel line."
                )
                good = False
            else:
                self.warning(
                    f"{text}; only PV-GRUB 2 finds it (GRUB legacy, as on EC2, "
                    f"does not); add 'root {expected}' before the kernel line."
                )
        return good

    def check_kernel(self, entry: MenuEntry) -> None:
        image, path = self.image, entry.kernel.path
        if not self.volume.exists(path):
            self.error(
                f"{image}: the kernel {path} named on line {entry.kernel.line} of "
                f"{MENU_LST} is not in the filesystem, so PV-GRUB stops with 'file "
                "not found'; fix the path or copy the kernel there."
            )
            return
        try:
            data = self.volume.read_file(path)
        except IsADirectoryError:
            self.error(
                f"{image}: the kernel {path} is a directory; point the kernel line "
                "at the kernel file."
            )
            return
        if not data:
            self.error(
                f"{image}: the kernel {path} is empty; copy the real kernel there."
            )
            return
        kernel = Kernel.from_bytes(data)
        name = f"the kernel {path} ({kernel.description})"
        if not self.check_compression(kernel, name):
            return
        if kernel.problem:
            self.error(
                f"{image}: {name} cannot be loaded: {kernel.problem}; give PV-GRUB "
                "an x86_64 Xen PV kernel as ELF, gzip-compressed ELF or bzImage."
            )
            return
        if not kernel.has_elf:
            return
        if kernel.elf_class == 32 or kernel.machine == "EM_386":
            self.error(
                f"{image}: {name} is a 32-bit i386 kernel; 32-bit PV images are out "
                "of pvlab's scope and a 64-bit PV-GRUB cannot start them; build it "
                "for x86_64."
            )
            return
        if not kernel.is_x86_64:
            self.error(
                f"{image}: {name} is built for {kernel.machine}, not x86_64; "
                "PV-GRUB on EC2 boots only x86_64 Xen PV kernels."
            )
            return
        if not kernel.loadable_segments:
            self.error(
                f"{image}: {name} has no loadable (PT_LOAD) segment; link it as an "
                "executable."
            )
        self.check_xen_notes(kernel, name)

    def check_compression(self, kernel: Kernel, name: str) -> bool:
        """False when nothing more can be learnt from the kernel."""
        image = self.image
        if kernel.wrapper == "xz" and self.legacy:
            self.error(
                f"{image}: {name}: GRUB legacy unpacks only gzip-compressed files, "
                "so PV-GRUB cannot load it; compress it with gzip or not at all."
            )
        compression = kernel.compression
        if kernel.format != "bzimage" or compression is None:
            return True
        refusal = self.payload_refusal(compression)
        if refusal:
            self.error(f"{image}: {name}: {refusal}")
        elif self.legacy and compression in _LEGACY_PAYLOAD_SINCE:
            self.warning(
                f"{image}: {name}: PV-GRUB reads {compression} only when built from "
                f"Xen {_LEGACY_PAYLOAD_SINCE[compression]} or later, and which Xen "
                "EC2's PV-GRUB AKIs were built from is not documented; rebuild it "
                "with CONFIG_KERNEL_GZIP=y to be safe."
            )
        if kernel.problem and compression in ("zstd", "lz4", "lzo"):
            if not refusal:
                self.warning(
                    f"{image}: {name}: pvlab cannot unpack {compression}, so the "
                    "kernel's ELF class and Xen notes went unchecked."
                )
            return False
        return True

    def payload_refusal(self, compression: str) -> str | None:
        """Why this PV-GRUB cannot load a bzImage payload so compressed, or None."""
        fix = "rebuild it with CONFIG_KERNEL_GZIP=y"
        if not self.legacy:
            if compression in _PVGRUB2_PAYLOADS:
                return None
            return (
                "PV-GRUB cannot read this compression (GRUB 2 decompresses a Xen "
                "kernel only with its gzio, xzio and lzopio modules, and pvlab's "
                f"image loads gzio and xzio); {fix} or CONFIG_KERNEL_XZ=y."
            )
        if compression == "none":
            return (
                "Xen's bzImage loader, which GRUB legacy PV-GRUB uses, accepts only "
                f"compressed payloads; {fix}."
            )
        if compression == "zstd":
            return (
                "PV-GRUB cannot read this compression on EC2 (Xen's PV-GRUB reads "
                "zstd only since Xen 4.15, long after EC2's PV-GRUB AKIs were "
                f"built); {fix}."
            )
        return None

    def check_xen_notes(self, kernel: Kernel, name: str) -> None:
        image, notes = self.image, kernel.xen_notes
        if not kernel.has_xen_notes:
            self.error(
                f"{image}: {name} is not a Xen PV kernel: it has no Xen ELF notes "
                "(.note.Xen) and no __xen_guest section, so Xen refuses it; build "
                "Linux with CONFIG_XEN_PV=y (or a unikernel for the Xen PV target)."
            )
            return
        loader, guest_os = str(notes.get("LOADER", "")), str(notes.get("GUEST_OS", ""))
        if not loader.startswith("generic") and not guest_os.startswith("linux"):
            self.error(
                f"{image}: {name} has Xen notes with GUEST_OS '{guest_os}' and "
                f"LOADER '{loader}'; Xen loads only kernels with LOADER 'generic' "
                "or GUEST_OS 'linux'; set XEN_ELFNOTE_LOADER to \"generic\"."
            )
        version = str(notes.get("XEN_VERSION", ""))
        if not version.startswith("xen-3.0"):
            self.error(
                f"{image}: {name} has Xen notes with XEN_VERSION '{version}'; Xen "
                'loads only kernels built for "xen-3.0"; set XEN_ELFNOTE_XEN_VERSION '
                'to "xen-3.0".'
            )
