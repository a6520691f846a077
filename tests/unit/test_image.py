"""Offline inspection of boot volumes finds what would stop EC2's PV-GRUB, one rule at
a time, on small volumes built with mke2fs -d and on the sample images."""

import gzip
import lzma
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvlab import image, sample
from pvlab.errors import ImageError, SettingsError

pytestmark = pytest.mark.unit

OFFSET = 1024 * 1024
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
LINUX_NOTES = (
    (6, "str", "linux"),
    (7, "str", "2.6"),
    (5, "str", "xen-3.0"),
    (3, "quad", 0xFFFFFFFF80000000),
    (1, "quad", 0xFFFFFFFF81000000),
    (2, "quad", 0xFFFFFFFF81001000),
    (8, "str", "generic"),
    (14, "long", 1),
)
MENU_HD0 = """default 0
timeout 0
hiddenmenu

title test kernel
root (hd0)
kernel /boot/vmlinuz console=hvc0 root=/dev/xvda1
initrd /boot/initrd.img
"""
MENU_HD00 = MENU_HD0.replace("(hd0)", "(hd0,0)")


@dataclass(frozen=True)
class Link:
    target: str


def errors(findings):
    return [f.message for f in findings if f.severity == "error"]


def warnings(findings):
    return [f.message for f in findings if f.severity == "warning"]


def one_error(findings, *parts):
    """The single error finding, which must name every part."""
    found = errors(findings)
    assert len(found) == 1, found
    for part in parts:
        assert part in found[0], found[0]
    return found[0]


# ---------------------------------------------------------------------------
# Builders: kernels with GNU as/ld, volumes with sfdisk and mke2fs -d.


def _note_asm(kind: int, style: str, value) -> str:
    if style == "str":
        desc = f'.asciz "{value}"'
    else:
        desc = f".{style} {value:#x}"
    return (
        "  .balign 4\n"
        f"  .long 2f - 1f\n  .long 4f - 3f\n  .long {kind}\n"
        f'1: .asciz "Xen"\n2: .balign 4\n3: {desc}\n4: .balign 4\n'
    )


def _assemble(work: Path, bits: int, notes, xen_guest: str | None) -> bytes:
    source = ".text\n.globl _start\n_start:\n  hlt\n  jmp _start\n"
    if notes:
        source += '.section .note.Xen, "a", @note\n'
        source += "".join(_note_asm(*note) for note in notes)
    if xen_guest is not None:
        source += f'.section __xen_guest\n  .asciz "{xen_guest}"\n'
    asm, obj, out = work / "k.s", work / "k.o", work / "k.elf"
    asm.write_text(source)
    machine = "elf_x86_64" if bits == 64 else "elf_i386"
    subprocess.run(["as", f"--{bits}", "-o", obj, asm], check=True)
    subprocess.run(
        ["ld", "-m", machine, "--build-id=sha1", "-e", "_start", "-o", out, obj],
        check=True,
    )
    return out.read_bytes()


@pytest.fixture(scope="session")
def kernels(tmp_path_factory):
    """Small Xen PV test kernels (ELF), built once per session."""
    work = tmp_path_factory.mktemp("kernels")
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as and ld build the test kernels")
    other_os = [
        n if n[0] not in (6, 8) else (n[0], "str", "Plan9") for n in LINUX_NOTES
    ]
    old_xen = [n if n[0] != 5 else (5, "str", "xen-2.0") for n in LINUX_NOTES]
    return {
        "linux": _assemble(work, 64, LINUX_NOTES, None),
        "i386": _assemble(work, 32, LINUX_NOTES, None),
        "plain": _assemble(work, 64, (), None),
        "other-os": _assemble(work, 64, other_os, None),
        "old-xen": _assemble(work, 64, old_xen, None),
        "xen-guest": _assemble(
            work,
            64,
            (),
            "GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xffffffff80000000,"
            "LOADER=generic,HYPERCALL_PAGE=0x2",
        ),
    }


def bzimage(payload: bytes, *, setup_sects: int = 4, version: int = 0x20F) -> bytes:
    """A Linux bzImage shell around a payload, gap of 0x100 bytes before it."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + b"\x90" * 0x100 + payload


def payload(elf: bytes, compression: str) -> bytes:
    """Compressed the way Linux does it: the stream, then the size, little-endian."""
    size = struct.pack("<I", len(elf))
    if compression == "gzip":
        return gzip.compress(elf) + size
    if compression == "xz":
        return lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if compression == "none":
        return elf
    magic = {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x02\x21\x4c\x18"}[compression]
    return magic + os.urandom(64) + size


def make_volume(
    tmp_path: Path,
    files: dict,
    *,
    layout: str = "hd0",
    fs: str = "ext2",
    inode_size: int = 128,
    features: str | None = None,
    table: str = "dos",
    part_type: str = "83",
    size_mib: int = 8,
) -> Path:
    """A boot volume holding files (bytes, text or Link), bare or partitioned."""
    staging = tmp_path / "staging"
    for path, content in files.items():
        target = staging / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            os.symlink(content.target, target)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    staging.mkdir(exist_ok=True)
    volume = tmp_path / f"{layout}.img"
    with volume.open("wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    mke2fs = ["mke2fs", "-q", "-F", "-t", fs, "-I", str(inode_size)]
    if features:
        mke2fs += ["-O", features]
    if layout == "hd0":
        command = [*mke2fs, "-d", staging, volume]
    else:
        kind = LINUX_FS_TYPE if table == "gpt" else part_type
        script = f"label: {table}\nunit: sectors\n\nstart=2048, type={kind}\n"
        subprocess.run(
            ["sfdisk", "--quiet", volume], input=script, text=True, check=True
        )
        size_kib = (size_mib * 1024 * 1024 - OFFSET - 64 * 1024) // 1024
        command = [*mke2fs, "-E", f"offset={OFFSET}", "-d", staging, volume]
        command.append(f"{size_kib}k")
    subprocess.run(command, check=True, capture_output=True)
    return volume


def boot_files(kernel: bytes, menu: str = MENU_HD0, **extra) -> dict:
    files = {
        "/boot/grub/menu.lst": menu,
        "/boot/vmlinuz": kernel,
        "/boot/initrd.img": b"initramfs",
    }
    files.update(extra)
    return files


@pytest.fixture
def good_kernel(kernels):
    return gzip.compress(kernels["linux"])


# ---------------------------------------------------------------------------
# menu.lst, as GRUB 0.97 reads it


def test_unik_menu_lst_boots_its_only_entry_from_hd0():
    menu = image.MenuLst.parse(sample.menu_lst("hd0"))

    entry = menu.default_entry
    assert (menu.default, menu.fallback, menu.timeout) == (0, (1,), 1)
    assert menu.is_menu_hidden
    assert entry.title == sample.MENU_TITLE and entry.root == "(hd0)"
    assert entry.kernel.path == "/boot/program.bin"
    assert entry.kernel.command_line == sample.KERNEL_COMMAND_LINE
    assert entry.initrd.path == "/boot/initrd.img"
    assert menu.problems == ()


def test_amazon_linux_menu_lst_with_equals_signs_reads_like_spaces():
    menu = image.MenuLst.parse(
        "# created by imagebuilder\n"
        "default=0\n"
        "timeout=1\n"
        "hiddenmenu\n"
        "\n"
        "title Amazon Linux 2014.09 (3.14.19-17.43.amzn1.x86_64)\n"
        "root (hd0)\n"
        "kernel /boot/vmlinuz-3.14.19-17.43.amzn1.x86_64 root=LABEL=/ console=hvc0 "
        "LANG=en_US.UTF-8 KEYTABLE=us\n"
        "initrd /boot/initramfs-3.14.19-17.43.amzn1.x86_64.img\n"
    )

    entry = menu.default_entry
    assert menu.timeout == 1
    assert entry.title == "Amazon Linux 2014.09 (3.14.19-17.43.amzn1.x86_64)"
    assert entry.kernel.path == "/boot/vmlinuz-3.14.19-17.43.amzn1.x86_64"
    assert entry.kernel.command_line.startswith("root=LABEL=/ console=hvc0")


def test_ubuntu_grub_legacy_ec2_menu_lst_skips_its_comment_blocks():
    menu = image.MenuLst.parse(
        "default\t\t0\n"
        "timeout\t\t0\n"
        "## ## Start Default Options ##\n"
        "# kopt=root=LABEL=cloudimg-rootfs ro console=hvc0\n"
        "# groot=(hd0)\n"
        "## ## End Default Options ##\n"
        "title\t\tUbuntu 14.04.5 LTS, kernel 3.13.0-170-generic\n"
        "root\t\t(hd0)\n"
        "kernel\t\t/boot/vmlinuz-3.13.0-170-generic root=LABEL=cloudimg-rootfs ro "
        "console=hvc0\n"
        "initrd\t\t/boot/initrd.img-3.13.0-170-generic\n"
        "\n"
        "title\t\tUbuntu 14.04.5 LTS, kernel 3.13.0-170-generic (recovery mode)\n"
        "root\t\t(hd0)\n"
        "kernel\t\t/boot/vmlinuz-3.13.0-170-generic root=LABEL=cloudimg-rootfs ro "
        "single\n"
        "### END DEBIAN AUTOMAGIC KERNELS LIST\n"
    )

    assert len(menu.entries) == 2
    assert menu.default_entry.title == "Ubuntu 14.04.5 LTS, kernel 3.13.0-170-generic"
    assert menu.default_entry.kernel.command_line.endswith("ro console=hvc0")
    assert menu.problems == ()


def test_tab_indented_centos_grub_conf_reads_the_partition_root():
    menu = image.MenuLst.parse(
        "default=0\r\ntimeout=0\r\n"
        "title CentOS (2.6.32-431.29.2.el6.x86_64)\r\n"
        "\troot (hd0,0)\r\n"
        "\tkernel /boot/vmlinuz-2.6.32-431.29.2.el6.x86_64 ro root=/dev/xvde1\r\n"
        "\tinitrd /boot/initramfs-2.6.32-431.29.2.el6.x86_64.img\r\n"
    )

    entry = menu.default_entry
    assert entry.root == "(hd0,0)"
    assert entry.kernel.command_line == "ro root=/dev/xvde1"
    assert image.parse_device(entry.root) == ("hd0", 0, "")


def test_default_saved_boots_the_first_entry_under_pv_grub():
    menu = image.MenuLst.parse(
        "default saved\ntitle a\nkernel /a\ntitle b\nkernel /b\n"
    )

    assert menu.default_is_saved
    assert menu.default_entry.title == "a"


def test_default_beyond_the_entries_boots_the_first_valid_fallback():
    menu = image.MenuLst.parse(
        "default 5\nfallback 7 1\ntitle a\nkernel /a\ntitle b\nkernel /b\n"
    )

    assert menu.default_index == 1
    assert menu.default_entry.title == "b"


def test_title_without_commands_is_not_counted_as_an_entry():
    menu = image.MenuLst.parse("default 1\ntitle empty\ntitle a\nkernel /a\n")

    assert [entry.title for entry in menu.entries] == ["a"]
    assert menu.default_entry.title == "a"
    assert any("has no commands" in str(p) for p in menu.problems)


def test_hash_after_a_command_is_passed_on_as_an_argument():
    menu = image.MenuLst.parse("title a\n  # a comment\nkernel /a ro # not a comment\n")

    assert menu.default_entry.kernel.command_line == "ro # not a comment"


def test_backslash_at_the_end_of_a_line_joins_the_next_one():
    menu = image.MenuLst.parse("title a\nkernel /a console=hvc0 \\\n  quiet\n")

    assert menu.default_entry.kernel.command_line == "console=hvc0    quiet"


def test_kernel_path_loses_its_device_prefix_and_loader_options():
    menu = image.MenuLst.parse(
        "title a\nkernel --no-mem-option (hd0,0)/boot/vmlinuz root=/dev/xvda1\n"
    )

    kernel = menu.default_entry.kernel
    assert (kernel.device, kernel.path) == ("(hd0,0)", "/boot/vmlinuz")
    assert kernel.root is None and kernel.effective_device == "(hd0,0)"
    assert kernel.command_line == "root=/dev/xvda1"


def test_title_and_kernel_accept_an_equals_sign():
    menu = image.MenuLst.parse("title=Xen guest\nroot=(hd0)\nkernel=/boot/x quiet\n")

    entry = menu.default_entry
    assert (entry.title, entry.root, entry.kernel.path) == (
        "Xen guest",
        "(hd0)",
        "/boot/x",
    )


def test_entry_commands_before_the_first_title_are_ignored_and_reported():
    menu = image.MenuLst.parse("root (hd0)\nkernel /x\ntitle a\nkernel /a\n")

    assert menu.default_entry.root is None
    assert any("ignores 'root' before the first title" in str(p) for p in menu.problems)


def test_unknown_command_is_reported_and_skipped():
    menu = image.MenuLst.parse("title a\nkernal /a\nkernel /b\n")

    assert menu.default_entry.kernel.path == "/b"
    assert [str(p) for p in menu.problems] == [
        "line 2: GRUB skips the unknown command 'kernal'"
    ]


def test_line_longer_than_grub_legacy_reads_is_cut():
    menu = image.MenuLst.parse("title a\nkernel /a " + "x" * 2000 + "\n")

    assert menu.cut_lines == (2,)
    assert len("kernel /a ") + len(menu.default_entry.kernel.command_line) == 1500


# ---------------------------------------------------------------------------
# Kernels


def test_gzip_compressed_elf_shows_its_entry_build_id_and_xen_notes(kernels):
    kernel = image.Kernel.from_bytes(gzip.compress(kernels["linux"]))

    assert kernel.description == "gzip-compressed ELF"
    assert kernel.is_x86_64 and kernel.problem is None
    assert kernel.entry > 0 and len(kernel.build_id) == 40
    assert kernel.loadable_segments
    assert kernel.xen_notes["GUEST_OS"] == "linux"
    assert kernel.xen_notes["XEN_VERSION"] == "xen-3.0"
    assert kernel.xen_notes["HYPERCALL_PAGE"] == 0xFFFFFFFF81001000
    assert kernel.xen_notes_source == "notes"


def test_bzimage_payload_is_found_after_the_setup_sectors(kernels):
    data = bzimage(payload(kernels["linux"], "gzip"), setup_sects=7)

    kernel = image.Kernel.from_bytes(data)

    assert kernel.description == "bzImage with a gzip payload"
    assert kernel.boot_protocol == (2, 15)
    assert kernel.xen_notes["LOADER"] == "generic"


def test_xz_bzimage_payload_is_unpacked_despite_the_size_trailer(kernels):
    kernel = image.Kernel.from_bytes(bzimage(payload(kernels["linux"], "xz")))

    assert kernel.compression == "xz" and kernel.problem is None
    assert kernel.has_xen_notes


def test_xen_guest_section_stands_in_for_xen_notes(kernels):
    kernel = image.Kernel.from_bytes(kernels["xen-guest"])

    assert kernel.xen_notes_source == "__xen_guest"
    assert kernel.xen_notes["XEN_VERSION"] == "xen-3.0"
    assert kernel.xen_notes["VIRT_BASE"] == 0xFFFFFFFF80000000


def test_bzimage_older_than_protocol_2_08_carries_no_elf():
    kernel = image.Kernel.from_bytes(bzimage(b"\x1f\x8b" + b"\0" * 64, version=0x206))

    assert kernel.boot_protocol == (2, 6)
    assert "older than 2.08" in kernel.problem


def test_text_file_is_not_a_kernel():
    kernel = image.Kernel.from_bytes(b"#!/bin/sh\necho hello\n")

    assert kernel.format == "unknown" and not kernel.has_elf
    assert "neither an ELF image nor a Linux bzImage" in kernel.problem


# ---------------------------------------------------------------------------
# The image path


def test_missing_image_is_a_finding_naming_the_path(tmp_path):
    findings = image.check(tmp_path / "nope.img")

    one_error(findings, "nope.img does not exist")


def test_directory_instead_of_an_image_is_a_finding(tmp_path):
    one_error(image.check(tmp_path), "is a directory", "raw image file")


def test_empty_image_is_a_finding(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()

    one_error(image.check(empty), "is empty (0 bytes)")


def test_boot_volume_refuses_a_missing_path_with_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        image.BootVolume(tmp_path / "nope.img")


def test_unknown_variant_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="auto, hd0, hd00"):
        image.check(tmp_path / "x.img", variant="hd1")


# ---------------------------------------------------------------------------
# Layout and filesystem


def test_volume_of_zeros_holds_no_filesystem(tmp_path):
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(4 * 1024 * 1024))

    one_error(image.check(zeros), "holds no filesystem at the start", "mke2fs")


def test_swap_volume_is_not_a_boot_filesystem(tmp_path):
    swap = tmp_path / "swap.img"
    swap.write_bytes(bytes(4 * 1024 * 1024))
    subprocess.run(["mkswap", swap], check=True, capture_output=True)

    one_error(
        image.check(swap), "holds a swap filesystem", "rebuild the volume as ext2"
    )


def test_gpt_partition_table_is_refused(tmp_path, good_kernel):
    volume = make_volume(
        tmp_path, boot_files(good_kernel, MENU_HD00), layout="hd00", table="gpt"
    )

    one_error(image.check(volume), "has a gpt partition table", "MBR")


def test_non_linux_partition_type_stops_only_grub_legacy(tmp_path, good_kernel):
    volume = make_volume(
        tmp_path, boot_files(good_kernel, MENU_HD00), layout="hd00", part_type="c"
    )

    one_error(image.check(volume), "partition 1 has type c", "sfdisk --part-type")
    assert errors(image.check(volume, flavor="pvgrub2")) == []


def test_mbr_without_partition_1_has_no_hd0_0(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel, MENU_HD00), layout="hd00")
    with volume.open("r+b") as handle:
        # Move the entry from slot 1 to slot 2 of the MBR's partition table.
        handle.seek(0x1BE)
        entry = handle.read(16)
        handle.seek(0x1BE)
        handle.write(bytes(16) + entry)

    one_error(image.check(volume), "MBR without a partition 1", "(hd0,0)")


def test_hd0_variant_of_a_partitioned_volume_fails_to_boot_on_ec2(
    tmp_path, good_kernel
):
    volume = make_volume(tmp_path, boot_files(good_kernel, MENU_HD00), layout="hd00")

    one_error(
        image.check(volume, variant="hd0"),
        "is partitioned (dos table, first partition at byte 1048576)",
        "variant hd0 was asked",
        "instance fails to boot",
        "use variant hd00",
    )


def test_hd00_variant_of_a_bare_volume_fails_to_boot_on_ec2(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel))

    one_error(
        image.check(volume, variant="hd00"),
        "bare ext2 filesystem without a partition table",
        "instance fails to boot",
        "use variant hd0",
    )


def test_ext4_with_the_64bit_feature_is_unreadable_by_grub_legacy(
    tmp_path, good_kernel
):
    volume = make_volume(
        tmp_path, boot_files(good_kernel), fs="ext4", inode_size=256, features="64bit"
    )

    one_error(image.check(volume), "has the 64bit feature", "mke2fs -O ^64bit")
    assert errors(image.check(volume, flavor="pvgrub2")) == []


def test_256_byte_inodes_warn_only_under_grub_legacy(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel), inode_size=256)

    legacy = image.check(volume)
    assert errors(legacy) == []
    assert any("256-byte inodes" in w and "-I 128" in w for w in warnings(legacy))
    assert image.check(volume, flavor="pvgrub2") == []


def test_inline_data_is_unreadable_by_any_pv_grub(tmp_path, good_kernel):
    volume = make_volume(
        tmp_path,
        boot_files(good_kernel),
        fs="ext4",
        inode_size=256,
        features="inline_data,^64bit",
    )

    one_error(image.check(volume, flavor="pvgrub2"), "inline_data")


# ---------------------------------------------------------------------------
# menu.lst in the volume


def test_missing_menu_lst_points_at_an_existing_grub_conf(tmp_path, good_kernel):
    files = boot_files(good_kernel)
    files["/boot/grub/grub.conf"] = files.pop("/boot/grub/menu.lst")
    volume = make_volume(tmp_path, files)

    one_error(
        image.check(volume), "/boot/grub/menu.lst is missing", "link menu.lst to it"
    )


def test_menu_lst_linked_to_grub_conf_is_followed(tmp_path, good_kernel):
    files = boot_files(good_kernel)
    files["/boot/grub/grub.conf"] = files.pop("/boot/grub/menu.lst")
    files["/boot/grub/menu.lst"] = Link("./grub.conf")
    volume = make_volume(tmp_path, files)

    assert image.check(volume) == []
    assert image.BootVolume(volume).menu_lst.default_entry.title == "test kernel"


def test_binary_menu_lst_is_refused(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=b"\0\x01\x02title"))

    one_error(image.check(volume), "menu.lst is not a text file")


def test_menu_without_entries_stops_pv_grub_at_its_prompt(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel, menu="default 0\n"))

    one_error(image.check(volume), "has no boot entry", "grub> prompt")


def test_default_entry_without_a_kernel_line(tmp_path, good_kernel):
    menu = "title first\nroot (hd0)\ninitrd /boot/initrd.img\n"
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(image.check(volume), "entry 'first' (line 1)", "has no kernel line")


def test_timeout_inside_the_booted_entry_stops_grub_legacy(tmp_path, good_kernel):
    menu = MENU_HD0.replace(
        "initrd /boot/initrd.img\n", "initrd /boot/initrd.img\ntimeout 5\n"
    )
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(image.check(volume), "'timeout' on line 9", "Error 27")
    pvgrub2 = image.check(volume, flavor="pvgrub2")
    assert (
        errors(pvgrub2) == []
        and "line 9: 'timeout' belongs above" in warnings(pvgrub2)[0]
    )


def test_unknown_command_in_menu_lst_is_a_warning(tmp_path, good_kernel):
    menu = MENU_HD0.replace("hiddenmenu", "hiddenmenu\nsplashimage_x (hd0)/x.xpm.gz")
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    findings = image.check(volume)
    assert errors(findings) == []
    assert (
        "line 4: GRUB skips the unknown command 'splashimage_x'"
        in warnings(findings)[0]
    )


def test_partition_root_on_a_bare_volume_is_refused(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=MENU_HD00))

    one_error(
        image.check(volume),
        "sets root (hd0,0) but this is a bare filesystem",
        "write 'root (hd0)'",
    )


def test_whole_disk_root_on_a_partitioned_volume_is_refused(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel), layout="hd00")

    one_error(
        image.check(volume),
        "sets root (hd0) but this is a partitioned volume",
        "write 'root (hd0,0)'",
    )


def test_kernel_device_prefix_must_match_the_layout(tmp_path, good_kernel):
    menu = MENU_HD0.replace("kernel /boot", "kernel (hd0,0)/boot")
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(
        image.check(volume), "reads (hd0,0)/boot/vmlinuz", "write (hd0)/boot/vmlinuz"
    )


def test_entry_without_any_device_fails_under_grub_legacy_only(tmp_path, good_kernel):
    menu = MENU_HD0.replace("root (hd0)\n", "")
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(image.check(volume), "network drive", "add 'root (hd0)'")
    pvgrub2 = image.check(volume, flavor="pvgrub2")
    assert errors(pvgrub2) == [] and "only PV-GRUB 2 finds it" in warnings(pvgrub2)[0]


def test_relative_kernel_path_is_refused(tmp_path, good_kernel):
    menu = MENU_HD0.replace("kernel /boot/vmlinuz", "kernel boot/vmlinuz")
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(image.check(volume), "names boot/vmlinuz", "write /boot/vmlinuz")


def test_command_line_longer_than_xen_passes_is_refused(tmp_path, good_kernel):
    menu = MENU_HD0.replace("console=hvc0", "console=hvc0 " + "x" * 1100)
    volume = make_volume(tmp_path, boot_files(good_kernel, menu=menu))

    one_error(image.check(volume), "is 1129 characters", "at most 1023")


def test_missing_initrd_is_refused(tmp_path, good_kernel):
    files = boot_files(good_kernel)
    del files["/boot/initrd.img"]
    volume = make_volume(tmp_path, files)

    one_error(image.check(volume), "initrd /boot/initrd.img named on line 8")


# ---------------------------------------------------------------------------
# The kernel in the volume


def test_missing_kernel_is_refused(tmp_path, good_kernel):
    files = boot_files(good_kernel)
    del files["/boot/vmlinuz"]
    volume = make_volume(tmp_path, files)

    one_error(image.check(volume), "kernel /boot/vmlinuz named on line 7", "not in the")


def test_text_file_as_kernel_is_refused(tmp_path):
    volume = make_volume(tmp_path, boot_files(b"#!/bin/sh\n"))

    one_error(image.check(volume), "cannot be loaded", "neither an ELF")


def test_i386_kernel_is_out_of_scope(tmp_path, kernels):
    volume = make_volume(tmp_path, boot_files(kernels["i386"]))

    one_error(image.check(volume), "32-bit i386 kernel", "out of pvlab's scope")


def test_kernel_without_xen_notes_is_not_a_pv_kernel(tmp_path, kernels):
    volume = make_volume(tmp_path, boot_files(kernels["plain"]))

    one_error(image.check(volume), "is not a Xen PV kernel", "CONFIG_XEN_PV=y")


def test_kernel_for_another_guest_os_and_loader_is_refused(tmp_path, kernels):
    volume = make_volume(tmp_path, boot_files(kernels["other-os"]))

    one_error(image.check(volume), "GUEST_OS 'Plan9'", "LOADER 'Plan9'")


def test_kernel_for_an_older_xen_interface_is_refused(tmp_path, kernels):
    volume = make_volume(tmp_path, boot_files(kernels["old-xen"]))

    one_error(image.check(volume), "XEN_VERSION 'xen-2.0'")


def test_zstd_payload_is_unreadable_by_both_pv_grubs(tmp_path, kernels):
    kernel = bzimage(payload(kernels["linux"], "zstd"))
    volume = make_volume(tmp_path, boot_files(kernel))

    for flavor in image.FLAVORS:
        one_error(
            image.check(volume, flavor=flavor),
            "bzImage with a zstd payload",
            "PV-GRUB cannot read this compression",
        )


def test_lz4_payload_fails_pv_grub_2_and_warns_grub_legacy(tmp_path, kernels):
    kernel = bzimage(payload(kernels["linux"], "lz4"))
    volume = make_volume(tmp_path, boot_files(kernel))

    one_error(image.check(volume, flavor="pvgrub2"), "PV-GRUB cannot read this")
    legacy = image.check(volume)
    assert errors(legacy) == []
    assert "Xen 4.4 or later" in warnings(legacy)[0]
    assert "pvlab cannot unpack lz4" in warnings(legacy)[1]


def test_xz_compressed_kernel_file_loads_only_under_pv_grub_2(tmp_path, kernels):
    kernel = lzma.compress(kernels["linux"], format=lzma.FORMAT_XZ)
    volume = make_volume(tmp_path, boot_files(kernel))

    one_error(image.check(volume), "xz-compressed ELF", "unpacks only gzip")
    assert image.check(volume, flavor="pvgrub2") == []


def test_uncompressed_payload_loads_only_under_pv_grub_2(tmp_path, kernels):
    kernel = bzimage(payload(kernels["linux"], "none"))
    volume = make_volume(tmp_path, boot_files(kernel))

    one_error(image.check(volume), "accepts only compressed payloads")
    assert image.check(volume, flavor="pvgrub2") == []


def test_xz_payload_loads_under_pv_grub_2_and_warns_grub_legacy(tmp_path, kernels):
    kernel = bzimage(payload(kernels["linux"], "xz"))
    volume = make_volume(tmp_path, boot_files(kernel))

    assert image.check(volume, flavor="pvgrub2") == []
    assert "Xen 4.3 or later" in warnings(image.check(volume))[0]


def test_good_small_volume_with_a_gzip_kernel_passes(tmp_path, good_kernel):
    volume = make_volume(tmp_path, boot_files(good_kernel))

    assert image.check(volume) == []


def test_partitioned_volume_files_are_read_through_the_partition(tmp_path, kernels):
    kernel = bzimage(payload(kernels["xen-guest"], "gzip"))
    volume_path = make_volume(tmp_path, boot_files(kernel, MENU_HD00), layout="hd00")

    volume = image.BootVolume(volume_path)

    assert volume.layout == "hd00" and volume.partition_offset == OFFSET
    assert volume.read_file("/boot/initrd.img") == b"initramfs"
    assert volume.kernel.xen_notes_source == "__xen_guest"
    assert image.check(volume_path) == []


# ---------------------------------------------------------------------------
# The sample images


@pytest.mark.parametrize("flavor", image.FLAVORS)
def test_sample_hd0_image_has_no_errors(hd0_image, flavor):
    assert errors(image.check(hd0_image, flavor=flavor)) == []


@pytest.mark.parametrize("flavor", image.FLAVORS)
def test_sample_hd00_image_has_no_errors(hd00_image, flavor):
    assert errors(image.check(hd00_image, flavor=flavor)) == []


def test_sample_images_pick_their_own_variant(hd0_image, hd00_image):
    bare, partitioned = image.BootVolume(hd0_image), image.BootVolume(hd00_image)

    assert image.pick_variant(bare) == "hd0" and not bare.has_partition_table
    assert image.pick_variant(partitioned) == "hd00"
    assert partitioned.partition_offset == sample.PARTITION_OFFSET
    assert (bare.filesystem_type, bare.inode_size) == ("ext2", 128)


def test_sample_kernel_is_a_64_bit_linux_pv_bzimage(hd0_image):
    volume = image.BootVolume(hd0_image)
    kernel = volume.kernel

    assert volume.kernel_path == "/boot/program.bin"
    assert kernel.format == "bzimage" and kernel.is_x86_64
    assert kernel.xen_notes["GUEST_OS"] == "linux"
    assert kernel.build_id and kernel.loadable_segments
