"""Role pvgrub: PV-GRUB 2 images that read menu.lst like EC2's AKIs, and legacy
PV-GRUB installed from prebuilt images or refused before anything is installed."""

import dataclasses
import gzip
import hashlib
from pathlib import Path

import pytest

from pvlab import provision
from pvlab.errors import SettingsError

from helpers import pvkernel

PVGRUB_DIR = "/var/lib/pvlab/pvgrub"


@pytest.mark.parametrize("variant", ["hd0", "hd00"])
def test_pvgrub2_image_is_a_xen_pv_elf(host, variant):
    image = host.file(f"{PVGRUB_DIR}/pvgrub2-x86_64-{variant}.elf")
    assert image.exists and image.size > 100_000
    assert host.check_output(f"head -c 4 {image.path} | od -An -c").split() == [
        "177", "E", "L", "F"
    ]


def test_hd0_image_embeds_the_menu_lst_lookup(host):
    script = host.file(f"{PVGRUB_DIR}/hd0/boot/grub/grub.cfg").content_string
    assert "legacy_configfile" in script and "/boot/grub/menu.lst" in script


@pytest.mark.parametrize("variant", ["hd0", "hd00"])
def test_prebuilt_legacy_image_is_installed_byte_for_byte(
    host, pvlab_settings, variant
):
    images = pvlab_settings.pvgrub_legacy_images
    if not images:
        pytest.skip(
            "no prebuilt legacy PV-GRUB is configured (settings "
            "pvgrub_legacy_image_hd0 / pvgrub_legacy_image_hd00)"
        )
    installed = host.file(f"{PVGRUB_DIR}/legacy-x86_64-{variant}.gz")
    assert installed.exists and installed.mode == 0o644
    expected = hashlib.sha256(images[variant].read_bytes()).hexdigest()
    assert installed.sha256sum == expected


def pvgrub_only_playbook(tmp_path) -> Path:
    playbook = tmp_path / "pvgrub.yml"
    playbook.write_text(
        "- name: Apply only the pvgrub role.\n"
        "  hosts: xen_hosts\n"
        "  become: true\n"
        "  roles:\n"
        "    - pvgrub\n"
    )
    return playbook


def _dom0_state(host) -> tuple[str, str]:
    packages = host.check_output("dpkg-query -W -f '${Package} ${Version}\\n'")
    files = host.check_output(
        f"find {PVGRUB_DIR} /var/log/pvlab -maxdepth 1 2>/dev/null | sort; "
        "ls -d /var/tmp/pvlab-pvgrub-legacy.* 2>/dev/null; true"
    )
    return packages, files


@pytest.mark.applies_roles
def test_legacy_build_without_its_sources_stops_before_installing_anything(
    dom0_vm, host, pvlab_settings, tmp_path
):
    missing = tmp_path / "no-such-extfiles"
    settings = dataclasses.replace(
        pvlab_settings,
        pvgrub_flavor="legacy",
        pvgrub_legacy_image_hd0="",
        pvgrub_legacy_image_hd00="",
        pvgrub_legacy_sources=str(missing),
    )
    playbook = pvgrub_only_playbook(tmp_path)
    before = _dom0_state(host)
    with pytest.raises(SettingsError) as error:
        provision.run_playbook(dom0_vm, settings, playbook=playbook)
    message = str(error.value)
    assert message.startswith(
        f"pvgrub_legacy_sources names {missing}, which is not a directory on this "
        "machine, so the legacy PV-GRUB build has none of newlib-1.16.0.tar.gz, "
    )
    assert "mini-os-4.17" in message and "pvgrub_legacy_image_hd0" in message
    assert "\n" not in message and message.count(". ") == 0
    assert _dom0_state(host) == before


@pytest.mark.applies_roles
def test_a_prebuilt_image_given_in_settings_is_installed_for_both_variants(
    dom0_vm, host, pvlab_settings, tmp_path
):
    # No real pv-grub is at hand here: the PV test kernel (an x86_64 PV ELF with
    # Xen notes, gzip'd like pv-grub-x86_64.gz) stands in for one, so this proves
    # the check-and-install path, not GRUB legacy itself.
    elf = pvkernel.build_pv_test_kernel(tmp_path / "build")
    image = tmp_path / "pv-grub-x86_64.gz"
    image.write_bytes(gzip.compress(elf.read_bytes(), mtime=0))
    settings = dataclasses.replace(
        pvlab_settings,
        pvgrub_legacy_image_hd0=str(image),
        pvgrub_legacy_image_hd00="",
        pvgrub_legacy_sources="",
    )
    playbook = pvgrub_only_playbook(tmp_path)
    try:
        provision.run_playbook(dom0_vm, settings, playbook=playbook)

        expected = hashlib.sha256(image.read_bytes()).hexdigest()
        for variant in ("hd0", "hd00"):
            installed = host.file(f"{PVGRUB_DIR}/legacy-x86_64-{variant}.gz")
            assert installed.exists and installed.sha256sum == expected
    finally:
        host.run(f"rm -f {PVGRUB_DIR}/legacy-x86_64-hd0.gz "
                 f"{PVGRUB_DIR}/legacy-x86_64-hd00.gz")
