"""The gdbsx hypervisor build, its xen_debug role and the pvtest PV kernel: what a
debugging user relies on before anything boots in dom0."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_NOTE_N_TYPE

from pvlab import xen_debug
from pvlab.errors import HostError, SettingsError

from helpers import PVKERNEL, pvkernel

REPO = Path(__file__).resolve().parents[2]
ROLE_DIR = REPO / "roles"
GRUB_LIB = Path("/usr/share/grub/grub-mkconfig_lib")
VERSION = "4.17.5+72-g01140da4e8-1"

unit = pytest.mark.unit



XEN_NOTES = {
    "GUEST_OS": 6,
    "XEN_VERSION": 5,
    "LOADER": 8,
    "ENTRY": 1,
    "HYPERCALL_PAGE": 2,
    "VIRT_BASE": 3,
    "PADDR_OFFSET": 4,
}


# ---------------------------------------------------------------- pvtest kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pvkernel.build_pv_test_kernel(tmp_path_factory.mktemp("pvtest"))


def xen_notes(path: Path) -> dict[int, bytes]:
    """The Xen notes of the PT_NOTE segments, as Xen's ELF loader reads them."""
    notes: dict[int, bytes] = {}
    with path.open("rb") as stream:
        for segment in ELFFile(stream).iter_segments():
            if segment["p_type"] != "PT_NOTE":
                continue
            for note in segment.iter_notes():
                if note["n_name"] != "Xen":
                    continue
                # pyelftools names the types it knows from GNU notes; undo that.
                kind = note["n_type"]
                if isinstance(kind, str):
                    kind = ENUM_NOTE_N_TYPE[kind]
                desc = note["n_descdata"]
                if isinstance(desc, str):
                    desc = desc.encode("latin-1")
                notes[kind] = bytes(desc)
    return notes


def number(desc: bytes) -> int:
    return int.from_bytes(desc, "little")


def symbol(path: Path, name: str) -> int:
    with path.open("rb") as stream:
        (found,) = (
            ELFFile(stream).get_section_by_name(".symtab").get_symbol_by_name(name)
        )
        return found["st_value"]


def gdb(path: Path, *commands: str) -> str:
    argv = ["gdb", "-batch", "-nx"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout + result.stderr


@unit
def test_pvtest_carries_the_xen_notes_a_pv_loader_requires(kernel):
    notes = xen_notes(kernel)

    assert set(XEN_NOTES.values()) <= set(notes)
    assert notes[XEN_NOTES["GUEST_OS"]] == b"pvtest\0"
    assert notes[XEN_NOTES["XEN_VERSION"]] == b"xen-3.0\0"
    assert notes[XEN_NOTES["LOADER"]] == b"generic\0"
    assert number(notes[XEN_NOTES["VIRT_BASE"]]) == pvkernel.VIRT_BASE
    assert number(notes[XEN_NOTES["PADDR_OFFSET"]]) == pvkernel.PADDR_OFFSET


@unit
def test_entry_and_hypercall_page_notes_point_into_the_loaded_text(kernel):
    notes = xen_notes(kernel)
    entry = number(notes[XEN_NOTES["ENTRY"]])
    hypercall_page = number(notes[XEN_NOTES["HYPERCALL_PAGE"]])

    with kernel.open("rb") as stream:
        elf = ELFFile(stream)
        assert elf["e_machine"] == "EM_X86_64" and elf["e_type"] == "ET_EXEC"
        assert entry == elf["e_entry"] == symbol(kernel, "_start")
        text = [
            segment
            for segment in elf.iter_segments()
            if segment["p_type"] == "PT_LOAD" and segment["p_flags"] & 1
        ]
    assert hypercall_page == symbol(kernel, "hypercall_page")
    assert hypercall_page % 4096 == 0
    assert len(text) == 1
    (segment,) = text
    start, size = segment["p_vaddr"], segment["p_filesz"]
    assert start == segment["p_paddr"] == pvkernel.LOAD_ADDRESS
    assert start <= entry < start + size
    assert start <= hypercall_page and hypercall_page + 4096 <= start + size


@unit
def test_readelf_shows_the_xen_notes_and_a_build_id(kernel):
    result = subprocess.run(
        ["readelf", "-n", str(kernel)], capture_output=True, text=True, check=True
    )

    xen_lines = [
        line for line in result.stdout.splitlines() if line.split()[:1] == ["Xen"]
    ]
    assert len(xen_lines) >= len(XEN_NOTES)
    assert re.search(r"Build ID: [0-9a-f]{40}", result.stdout)
    assert len(xen_debug.elf_build_id(kernel)) == 40


@unit
def test_gdb_on_the_host_finds_pvtest_compute_and_its_source(kernel):
    address = symbol(kernel, "pvtest_compute")

    output = gdb(
        kernel,
        "info address pvtest_compute",
        "list pvtest_compute",
        "info scope pvtest_compute",
        "info line pvtest_main",
    )

    assert f'Symbol "pvtest_compute" is a function at address {address:#x}' in output
    assert "unsigned int seed = PVTEST_SEED;" in output
    assert re.search(r"Symbol seed is [^,]*, length 4", output)
    assert "pvtest.c" in output and "<pvtest_main>" in output


@unit
def test_debug_info_keeps_the_seed_macro_and_variable(kernel):
    with kernel.open("rb") as stream:
        elf = ELFFile(stream)
        assert elf.has_dwarf_info()
        dwarf = elf.get_dwarf_info()
        functions: dict[str, DIE] = {}
        for unit_ in dwarf.iter_CUs():
            for die in unit_.iter_DIEs():
                if die.tag == "DW_TAG_subprogram" and "DW_AT_name" in die.attributes:
                    functions[die.attributes["DW_AT_name"].value.decode()] = die
        assert {"pvtest_main", "pvtest_compute"} <= set(functions)
        variables = [
            child.attributes["DW_AT_name"].value.decode()
            for child in functions["pvtest_compute"].iter_children()
            if child.tag == "DW_TAG_variable"
        ]
        assert "seed" in variables
        section_names = {section.name for section in elf.iter_sections()}
    # -g3: gdb can expand PVTEST_SEED itself.
    assert ".debug_macro" in section_names
    output = gdb(kernel, "list pvtest_compute", "info macro PVTEST_SEED")
    assert "0x5eed1234u" in output


@unit
def test_pvtest_uses_no_vector_registers(kernel):
    # A PV kernel that touches SSE before it sets up FPU switching faults.
    result = subprocess.run(
        ["objdump", "-d", str(kernel)], capture_output=True, text=True, check=True
    )

    assert "pvtest_compute" in result.stdout
    assert not re.search(r"%[xyz]mm\d", result.stdout)


@unit
def test_printed_compute_line_matches_what_python_expects(tmp_path):
    # The same C function, compiled for the host, must agree with the value the
    # e2e tests look for on the guest's console.
    harness = tmp_path / "harness.c"
    harness.write_text(
        "#include <stdio.h>\n"
        "char hypercall_page[4096];\n"
        "char pvtest_virt_base[1];\n"
        f'#include "{PVKERNEL / "pvtest.c"}"\n'
        "int main(void)\n"
        "{\n"
        '\tprintf("pvtest: pvtest_compute(%d) = %#010x\\n", PVTEST_ROUNDS,\n'
        "\t       pvtest_compute(PVTEST_ROUNDS));\n"
        "\treturn 0;\n"
        "}\n"
    )
    binary = tmp_path / "harness"
    subprocess.run(
        ["gcc", "-w", "-o", str(binary), str(harness)], check=True, capture_output=True
    )

    printed = subprocess.run([str(binary)], capture_output=True, text=True, check=True)

    assert printed.stdout.strip() == pvkernel.compute_line()
    assert pvkernel.expected_compute() != pvkernel.SEED


def debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


@unit
@pytest.mark.parametrize("compress", [False, True], ids=["elf", "gzip"])
def test_boot_volume_holds_pvtest_as_program_bin(tmp_path, kernel, compress):
    image = pvkernel.build_pv_test_volume(tmp_path, compress=compress)

    program = debugfs_cat(image, "/boot/program.bin")
    menu = debugfs_cat(image, "/boot/grub/menu.lst").decode()

    if compress:
        program = gzip.decompress(program)
    assert program[:4] == b"\x7fELF"
    assert program == (tmp_path / "kernel" / "pvtest.elf").read_bytes()
    assert "root (hd0)\n" in menu
    assert "kernel /boot/program.bin console=hvc0\n" in menu
    assert "initrd" not in menu


@unit
@pytest.mark.parametrize("layout", ["hd0", "hd00"])
@pytest.mark.parametrize("flavor", ["legacy", "pvgrub2"])
def test_volume_checker_finds_nothing_that_stops_pv_grub(tmp_path, layout, flavor):
    from pvlab import image

    volume = pvkernel.build_pv_test_volume(tmp_path, layout=layout, compress=True)

    assert image.check(volume, flavor=flavor) == []


# ---------------------------------------------------------------- build inputs


@unit
@pytest.mark.parametrize(
    "version",
    [VERSION, "4.17.7+13-g2445b30a44-0+deb12u1", "1:4.17.5-1"],
)
def test_debian_versions_of_xen_are_accepted(version):
    assert xen_debug.check_version(version) == version


@unit
@pytest.mark.parametrize("version", ["4.17", "", "latest", "4.17.5 -1", "../4.17-1"])
def test_a_version_that_is_no_debian_version_is_refused_with_the_fix(version):
    with pytest.raises(SettingsError, match="dpkg-query -W xen-utils-common"):
        xen_debug.build_debug_xen(Path("/nonexistent"), version)


@unit
def test_build_key_is_stable_and_follows_the_version_and_the_patch():
    key = xen_debug.build_key(VERSION)

    assert key == xen_debug.build_key(VERSION)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key != xen_debug.build_key("4.17.7+13-g2445b30a44-0+deb12u1")
    assert key != xen_debug.build_key(VERSION, patch_text="another patch\n")


@unit
def test_artefact_dir_names_the_version_and_the_key(tmp_path):
    directory = xen_debug.artefact_dir(tmp_path, "1:4.17.5-1")

    assert directory.parent == tmp_path
    assert directory.name == f"xen-4.17.5-1-gdbsx-{xen_debug.build_key('1:4.17.5-1')}"
    assert xen_debug.dsc_name("1:4.17.5-1") == "xen_4.17.5-1.dsc"


def fake_cached_build(cache_dir: Path, version: str) -> Path:
    directory = xen_debug.artefact_dir(cache_dir, version)
    directory.mkdir(parents=True)
    for name in ("xen-4.17.5-gdbsx.gz", "gdbsx", "xen-syms-4.17.5-gdbsx"):
        (directory / name).write_bytes(b"fake")
    meta = {
        "version": version,
        "hypervisor": "xen-4.17.5-gdbsx.gz",
        "gdbsx": "gdbsx",
        "xen_syms": "xen-syms-4.17.5-gdbsx",
        "config": "xen-4.17.5-gdbsx.config",
        "full_version": "4.17.5-gdbsx",
        "xen_extra": ".5-gdbsx",
        "build_id": "ab" * 20,
        "gdbsx_static": True,
        "seconds": {"total": 106.0},
    }
    (directory / xen_debug.METADATA).write_text(json.dumps(meta))
    return directory


@unit
def test_a_cached_build_is_handed_out_without_building(tmp_path, monkeypatch):
    directory = fake_cached_build(tmp_path, VERSION)

    def no_build(*args, **kwargs):
        raise AssertionError("a cached build must not build again")

    monkeypatch.setattr(xen_debug, "ensure_build_deps", no_build)
    monkeypatch.setattr(xen_debug, "fetch_source", no_build)

    built = xen_debug.build_debug_xen(tmp_path, VERSION, progress=no_build)

    assert built.hypervisor == directory / "xen-4.17.5-gdbsx.gz"
    assert built.boot_path == "/boot/xen-4.17.5-gdbsx.gz"
    assert built.role_vars() == {
        "xen_debug_hypervisor_src": str(directory / "xen-4.17.5-gdbsx.gz"),
        "xen_debug_gdbsx_src": str(directory / "gdbsx"),
        "xen_debug_xen_extra": ".5-gdbsx",
        "xen_debug_build_id": "ab" * 20,
    }


@unit
def test_a_build_of_another_recipe_is_not_reused(tmp_path, monkeypatch):
    fake_cached_build(tmp_path, VERSION)
    monkeypatch.setattr(xen_debug, "RECIPE_VERSION", xen_debug.RECIPE_VERSION + 1)

    def stop(progress=print):
        raise HostError("stop before building")

    monkeypatch.setattr(xen_debug, "ensure_build_deps", stop)

    assert xen_debug.cached_debug_xen(tmp_path, VERSION) is None
    with pytest.raises(HostError, match="stop before building"):
        xen_debug.build_debug_xen(tmp_path, VERSION)
    assert not xen_debug.artefact_dir(tmp_path, VERSION).exists()


@unit
def test_source_lines_cover_release_updates_and_security():
    text = xen_debug.deb_src_lines(
        "http://mirror.invalid/debian/",
        "http://mirror.invalid/debian-security",
        keyring=Path("/usr/share/keyrings/k.gpg"),
    )

    signed = "deb-src [signed-by=/usr/share/keyrings/k.gpg]"
    assert text.splitlines() == [
        f"{signed} http://mirror.invalid/debian bookworm main",
        f"{signed} http://mirror.invalid/debian bookworm-updates main",
        f"{signed} http://mirror.invalid/debian-security bookworm-security main",
    ]
    assert "security" not in xen_debug.deb_src_lines("http://m.invalid/debian", None)


@unit
def test_gdbsx_settings_win_over_debians_hypervisor_config():
    debian = "CONFIG_DEBUG=n\n# CONFIG_GDBSX is not set\nCONFIG_EXPERT=n"

    settings = xen_debug.kconfig_settings(xen_debug.kconfig_text(debian))

    assert settings["CONFIG_DEBUG"] == "n"
    assert settings["CONFIG_EXPERT"] == "y"
    assert settings["CONFIG_GDBSX"] == "y"
    assert settings["CONFIG_UNSUPPORTED"] == "n"


@unit
def test_xen_extra_is_what_xl_info_prints_for_the_build():
    assert xen_debug.xen_extra("4.17.5-gdbsx") == ".5-gdbsx"
    assert xen_debug.xen_extra("4.17-gdbsx") == "-gdbsx"


@unit
def test_hypervisor_build_drops_dpkg_flags_and_dates_itself_from_the_changelog():
    env = xen_debug.build_env(
        {"CFLAGS": "-O2 -fstack-protector", "PATH": "/usr/bin"},
        xen_version=VERSION,
        source_date_epoch=1764424345,
    )

    assert "CFLAGS" not in env and env["PATH"] == "/usr/bin"
    assert env["XEN_BUILD_DATE"] == "Sat Nov 29 13:52:25 UTC 2025"
    assert env["XEN_BUILD_TIME"] == "13:52:25"
    assert env["DEB_VERSION"] == VERSION


@unit
def test_gdbsx_patch_makes_the_stub_listen_on_loopback_only():
    patch = xen_debug.gdbsx_patch_text()
    targets = re.findall(r"^\+\+\+ b/(\S+)", patch, flags=re.MULTILINE)
    removed = [line for line in patch.splitlines() if line.startswith("-    ")]
    added = [line for line in patch.splitlines() if line.startswith("+    ")]

    assert targets == ["tools/debugger/gdbsx/gx/gx_comm.c"]
    assert removed == ["-    sockaddr.sin_addr.s_addr = INADDR_ANY;"]
    assert "+    sockaddr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);" in added


@unit
@pytest.mark.skipif(not GRUB_LIB.is_file(), reason="grub-common is not installed")
def test_grub_puts_the_gdbsx_hypervisor_in_its_top_level_xen_entry():
    # 20_linux_xen fills the top-level entry with version_find_latest's pick.
    def latest(*files: str) -> str:
        script = f'. {GRUB_LIB}; version_find_latest "$@"'
        result = subprocess.run(
            ["sh", "-c", script, "sh", *files],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    debian = "/boot/xen-4.17-amd64.gz"
    ours = "/boot/xen-4.17.5-gdbsx.gz"

    assert latest(debian, ours) == ours
    assert latest(ours, debian) == ours
    assert (
        latest(debian, "/boot/xen-4.17.7-gdbsx.gz", ours) == "/boot/xen-4.17.7-gdbsx.gz"
    )


# ---------------------------------------------------------------- xen_debug role


FAKE_UPDATE_GRUB = """\
#!/bin/sh
# Stands in for update-grub: writes a menu whose top-level Xen entry loads the
# hypervisor GRUB's own version_find_latest picks, as 20_linux_xen does.
set -e
. {grub_lib}
latest=$(version_find_latest {boot}/xen*.gz)
cat > {boot}/grub/grub.cfg <<EOF
menuentry 'Debian GNU/Linux' --class debian {{
	linux	/boot/vmlinuz-6.1.0-41-amd64 root=/dev/vda1 ro
}}
menuentry 'Debian GNU/Linux, with Xen hypervisor' --class debian --class xen {{
	echo	'Loading Xen ...'
	multiboot2	/boot/$(basename $latest) placeholder dom0_mem=1024M
	module2	/boot/vmlinuz-6.1.0-41-amd64 placeholder root=/dev/vda1 ro
}}
EOF
echo run >> {boot}/update-grub.runs
"""

FAKE_XL = """\
#!/bin/sh
# Stands in for `xl info`, reporting what the test says the hypervisor is.
cat {info}
"""


def xl_info(extra: str, build_id: str) -> str:
    return (
        "host                   : dom0\n"
        "xen_major              : 4\n"
        "xen_minor              : 17\n"
        f"xen_extra              : {extra}\n"
        "xen_version            : 4.17" + extra + "\n"
        f"build_id               : {build_id}\n"
    )


class RoleSandbox:
    """The xen_debug role run by ansible-playbook on this machine, its dom0 paths
    moved into a temporary directory and update-grub and xl faked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.boot = root / "boot"
        (self.boot / "grub").mkdir(parents=True)
        (self.boot / "xen-4.17-amd64.gz").write_bytes(b"debian hypervisor")
        (root / "etc/default/grub.d").mkdir(parents=True)
        (root / "usr/local/sbin").mkdir(parents=True)
        artefacts = root / "controller"
        artefacts.mkdir()
        self.hypervisor = artefacts / "xen-4.17.5-gdbsx.gz"
        self.hypervisor.write_bytes(gzip.compress(b"\x7fELF gdbsx hypervisor"))
        self.gdbsx = artefacts / "gdbsx"
        self.gdbsx.write_bytes(b"\x7fELF gdbsx tool")
        self.info = root / "xl-info.txt"
        self.set_running(".5", "11" * 20)
        update_grub = root / "update-grub"
        update_grub.write_text(
            FAKE_UPDATE_GRUB.format(grub_lib=GRUB_LIB, boot=self.boot)
        )
        xl = root / "xl"
        xl.write_text(FAKE_XL.format(info=self.info))
        for script in (update_grub, xl):
            script.chmod(0o755)
        self.playbook = root / "play.yml"
        self.playbook.write_text(
            "- hosts: localhost\n  gather_facts: false\n  roles:\n    - xen_debug\n"
        )
        self.vars = {
            "xen_debug_hypervisor_src": str(self.hypervisor),
            "xen_debug_gdbsx_src": str(self.gdbsx),
            "xen_debug_xen_extra": ".5-gdbsx",
            "xen_debug_build_id": "22" * 20,
            "xen_debug_boot_dir": str(self.boot),
            "xen_debug_gdbsx_path": str(root / "usr/local/sbin/gdbsx"),
            "xen_debug_grub_default_file": str(
                root / "etc/default/grub.d/zzz-pvlab-xen-debug.cfg"
            ),
            "xen_debug_grub_cfg": str(self.boot / "grub/grub.cfg"),
            "xen_debug_update_grub_command": str(update_grub),
            "xen_debug_xl_command": str(xl),
            # Never reboot this machine; the role then only says a reboot is due.
            "xen_debug_reboot": False,
        }

    def set_running(self, extra: str, build_id: str) -> None:
        self.info.write_text(xl_info(extra, build_id))

    def run(self, check: bool = True) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "ANSIBLE_ROLES_PATH": str(ROLE_DIR),
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        }
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "-i",
                "localhost,",
                "-c",
                "local",
                "-e",
                json.dumps(self.vars),
                str(self.playbook),
            ],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    @staticmethod
    def changed(result: subprocess.CompletedProcess) -> int:
        match = re.search(r"localhost\s*:.*changed=(\d+)", result.stdout)
        assert match, result.stdout
        return int(match.group(1))


needs_grub_lib = pytest.mark.skipif(
    not GRUB_LIB.is_file(), reason="grub-common is not installed"
)


@unit
@needs_grub_lib
def test_role_installs_both_artefacts_and_boots_the_gdbsx_entry(tmp_path):
    sandbox = RoleSandbox(tmp_path)

    result = sandbox.run()

    boot_file = sandbox.boot / "xen-4.17.5-gdbsx.gz"
    gdbsx = tmp_path / "usr/local/sbin/gdbsx"
    assert boot_file.read_bytes() == sandbox.hypervisor.read_bytes()
    assert gdbsx.read_bytes() == sandbox.gdbsx.read_bytes()
    assert os.access(gdbsx, os.X_OK)
    assert (
        "multiboot2\t/boot/xen-4.17.5-gdbsx.gz"
        in (sandbox.boot / "grub/grub.cfg").read_text()
    )
    default = (tmp_path / "etc/default/grub.d/zzz-pvlab-xen-debug.cfg").read_text()
    assert (
        'GRUB_DEFAULT="${GRUB_DISTRIBUTOR} GNU/Linux, with Xen hypervisor"' in default
    )
    assert "Reboot dom0 to start xen-4.17.5-gdbsx.gz" in result.stdout
    stock_build_id = "11" * 20
    assert f"xen_extra '.5' and build id '{stock_build_id}'" in result.stdout


@unit
@needs_grub_lib
def test_second_run_of_the_role_changes_nothing(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    sandbox.run()

    again = sandbox.run()

    assert RoleSandbox.changed(again) == 0
    assert (sandbox.boot / "update-grub.runs").read_text().count("run") == 1


@unit
@needs_grub_lib
def test_role_wants_no_reboot_once_the_same_gdbsx_build_runs(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    sandbox.set_running(".5-gdbsx", "22" * 20)

    result = sandbox.run()

    assert "Reboot dom0" not in result.stdout


@unit
@needs_grub_lib
def test_role_wants_a_reboot_when_another_gdbsx_build_runs(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    sandbox.set_running(".5-gdbsx", "33" * 20)

    result = sandbox.run()

    assert "Reboot dom0 to start xen-4.17.5-gdbsx.gz" in result.stdout


@unit
@needs_grub_lib
def test_role_removes_gdbsx_hypervisors_of_older_builds(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    (sandbox.boot / "xen-4.17.9-gdbsx.gz").write_bytes(b"an older build")

    sandbox.run()

    assert not (sandbox.boot / "xen-4.17.9-gdbsx.gz").exists()
    assert (sandbox.boot / "xen-4.17-amd64.gz").exists()
    assert "/boot/xen-4.17.5-gdbsx.gz" in (sandbox.boot / "grub/grub.cfg").read_text()


@unit
@needs_grub_lib
def test_role_fails_when_a_newer_hypervisor_would_boot_instead(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    (sandbox.boot / "xen-4.18-amd64.gz").write_bytes(b"a newer Debian hypervisor")

    result = sandbox.run(check=False)

    assert result.returncode != 0
    assert "loads 'xen-4.18-amd64.gz', not xen-4.17.5-gdbsx.gz" in result.stdout


@unit
def test_role_refuses_to_run_without_the_artefacts(tmp_path):
    sandbox = RoleSandbox(tmp_path)
    sandbox.vars["xen_debug_hypervisor_src"] = ""

    result = sandbox.run(check=False)

    assert result.returncode != 0
    assert "Set xen_debug_hypervisor_src" in result.stdout


# ---------------------------------------------------------------- real source


@pytest.fixture(scope="module")
def release_version() -> str:
    # The version debootstrap puts in dom0; the host's mirror serves its source.
    return xen_debug.suite_version()


@pytest.mark.e2e
def test_debian_source_unpacks_and_the_gdbsx_patch_applies(tmp_path, release_version):
    log_path = tmp_path / "build.log"
    xen_debug.ensure_build_deps()
    dsc = xen_debug.fetch_source(
        tmp_path, release_version, log_path=log_path, progress=lambda line: None
    )
    tree = tmp_path / "src"
    subprocess.run(
        ["dpkg-source", "--no-copy", "-x", str(dsc), str(tree)],
        check=True,
        capture_output=True,
    )

    xen_debug.apply_gdbsx_patch(tree, log_path)
    include = tmp_path / "include"
    xen_debug.public_headers(tree, include, log_path)
    static = xen_debug.compile_gdbsx(tree, include, tmp_path / "gdbsx", log_path)

    comm = (tree / "tools/debugger/gdbsx/gx/gx_comm.c").read_text()
    assert "htonl(INADDR_LOOPBACK)" in comm
    assert "s_addr = INADDR_ANY" not in comm
    assert static and xen_debug.elf_is_static(tmp_path / "gdbsx")
    # The binary stores 127.0.0.1 (network order) as the address it binds to.
    disassembly = subprocess.run(
        ["objdump", "-d", str(tmp_path / "gdbsx")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "$0x100007f," in disassembly
    assert (tree / "debian/xen-kconfig").is_file()


@pytest.mark.e2e
def test_rebuilt_hypervisor_has_gdbsx_and_is_cached(release_version):
    from pvlab import settings

    cache_dir = settings.load().cache_dir
    built = xen_debug.build_debug_xen(cache_dir, release_version)

    started = time.monotonic()
    again = xen_debug.build_debug_xen(cache_dir, release_version)

    assert time.monotonic() - started < 5
    assert again == built
    assert built.hypervisor.name == f"xen-{built.full_version}.gz"
    assert built.full_version.endswith("-gdbsx")
    assert xen_debug.elf_has_symbol(built.xen_syms, "gdbsx_guest_mem_io")
    assert xen_debug.elf_build_id(built.xen_syms) == built.build_id
    with gzip.open(built.hypervisor) as stream:
        assert stream.read(4) == b"\x7fELF"
    config = xen_debug.kconfig_settings(built.config.read_text())
    assert config["CONFIG_GDBSX"] == "y" and config["CONFIG_UNSUPPORTED"] == "n"
    assert built.gdbsx_static and xen_debug.elf_is_static(built.gdbsx)
