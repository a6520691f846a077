"""Unit tests of the box builder's pure parts: apt sources, cache key, boot files."""

import functools
import subprocess
from pathlib import Path

import pytest

from pvlab import box
from pvlab.errors import SettingsError

pytestmark = pytest.mark.unit

MIRROR = "http://mirror.example/debian"
SECURITY = "http://mirror.example/debian-security"
UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

DEB822 = f"""\
Types: deb
# a comment inside the stanza must not end it
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

THIRD_PARTY_DEB822 = """\
Types: deb
URIs: http://vendor.example/apt
Suites: nodistro
Components: main
"""


def apt_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "etc/apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_mirror_is_read_from_deb822_sources(tmp_path):
    root = apt_root(tmp_path, {"sources.list.d/debian.sources": DEB822})

    assert box.mirror_from_host(root) == MIRROR
    assert box.security_mirror_from_host(root) == SECURITY


def test_mirror_is_read_from_one_line_sources_list(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list": (
                "# deb http://old.example/debian bookworm main\n"
                f"deb [arch=amd64 signed-by=/k.gpg] {MIRROR} bookworm main contrib\n"
                f"deb {SECURITY} bookworm-security main\n"
            ),
        },
    )

    assert box.mirror_from_host(root) == MIRROR
    assert box.security_mirror_from_host(root) == SECURITY


def test_https_third_party_and_disabled_sources_are_ignored(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list.d/a-https.list": (
                "deb https://secure.example/debian bookworm main\n"
            ),
            "sources.list.d/b-vendor.sources": THIRD_PARTY_DEB822,
            "sources.list.d/c-vendor.list": (
                "deb http://vendor.example/d bookworm stable\n"
            ),
            "sources.list.d/d-off.sources": (
                "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\n"
                "Suites: bookworm\nComponents: main\n"
            ),
            "sources.list.d/e-src.list": (
                "deb-src http://src.example/debian bookworm main\n"
            ),
            "sources.list.d/f-debian.sources": DEB822,
            "sources.list.d/g-disabled.list.disabled": (
                "deb http://x.example/ bookworm main\n"
            ),
        },
    )

    assert box.mirror_from_host(root) == MIRROR


def test_host_without_debian_source_names_the_setting(tmp_path):
    root = apt_root(tmp_path, {"sources.list.d/vendor.sources": THIRD_PARTY_DEB822})

    with pytest.raises(SettingsError, match="mirror"):
        box.mirror_from_host(root)
    assert box.security_mirror_from_host(root) is None


def test_cache_key_is_stable_and_ignores_package_order():
    first = box.cache_key(MIRROR, ssh_public_key="ssh-rsa AAA key")
    again = box.cache_key(
        MIRROR + "/",
        ssh_public_key="ssh-rsa AAA key\n",
        packages=reversed(box.PACKAGES),
    )

    assert first == again
    assert len(first) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"mirror": "http://other.example/debian"},
        {"security_mirror": SECURITY},
        {"ssh_public_key": "ssh-ed25519 BBB other"},
        {"packages": (*box.PACKAGES, "gdb")},
        {"version": box.SCRIPT_VERSION + 1},
    ],
)
def test_cache_key_changes_with_each_input(change):
    inputs = {"mirror": MIRROR, "ssh_public_key": "ssh-rsa AAA key"}
    base = box.cache_key(**inputs)

    assert box.cache_key(**(inputs | change)) != base


def test_root_uuid_follows_the_cache_key():
    assert box.root_uuid("abc") == box.root_uuid("abc")
    assert box.root_uuid("abc") != box.root_uuid("abd")


def test_grub_cfg_boots_the_kernel_on_the_serial_console():
    text = box.grub_cfg_text("6.1.0-50-amd64", UUID)

    assert f"search --no-floppy --fs-uuid --set=root {UUID}" in text
    assert (
        f"linux /boot/vmlinuz-6.1.0-50-amd64 root=UUID={UUID} ro "
        "net.ifnames=0 console=ttyS0" in text
    )
    assert "initrd /boot/initrd.img-6.1.0-50-amd64" in text
    assert "terminal_output serial console" in text
    assert text.count("{") == text.count("}")


def test_fstab_mounts_root_by_uuid():
    lines = [
        line.split()
        for line in box.fstab_text(UUID).splitlines()
        if not line.startswith("#")
    ]

    assert lines == [[f"UUID={UUID}", "/", "ext4", "errors=remount-ro", "0", "1"]]


def test_default_grub_keeps_kernel_options_for_update_grub():
    debian = (
        "GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
        "#GRUB_TERMINAL=console\n"
    )

    text = box.default_grub_text(debian)

    assert 'GRUB_CMDLINE_LINUX="net.ifnames=0 console=ttyS0"' in text.splitlines()
    assert 'GRUB_TERMINAL="serial console"' in text.splitlines()
    assert "GRUB_TIMEOUT=1" in text.splitlines()
    assert "GRUB_DEFAULT=0" in text.splitlines()
    assert text.count("GRUB_CMDLINE_LINUX=") == 1
    assert box.default_grub_text(text) == text


def test_box_apt_sources_use_the_given_mirrors():
    assert box.sources_list_text(MIRROR, None).splitlines() == [
        f"deb {MIRROR} bookworm main",
        f"deb {MIRROR} bookworm-updates main",
    ]
    assert f"deb {SECURITY} bookworm-security main" in box.sources_list_text(
        MIRROR, SECURITY
    )


def test_boot_sector_keeps_the_partition_table_free():
    boot_img = bytes(range(256)) * 2

    code = box.boot_sector(boot_img)

    assert len(code) == 440
    assert code[0x66:0x68] == b"\x90\x90"
    assert code[:0x66] == boot_img[:0x66]


def test_box_is_added_only_when_missing_or_outdated(tmp_path, monkeypatch):
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant"))
    box_path = tmp_path / "debian12-x.box"
    box_path.write_bytes(b"box")
    Path(f"{box_path}.sha256").write_text(f"abc123  {box_path.name}\n")
    calls = []

    def fake_vagrant(cmd, **kwargs):
        calls.append(cmd)
        installed = box.vagrant_box_dir("pvlabtest/debian12")
        installed.mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(box.subprocess, "run", fake_vagrant)
    add = functools.partial(
        box.add_box, box_path, "pvlabtest/debian12", progress=lambda _: None
    )

    assert add() is True
    assert add() is False
    assert len(calls) == 1
    assert calls[0][:6] == [
        "vagrant",
        "box",
        "add",
        "--force",
        "--name",
        "pvlabtest/debian12",
    ]

    Path(f"{box_path}.sha256").write_text(f"def456  {box_path.name}\n")
    assert add() is True
    assert len(calls) == 2
