from pathlib import Path

import pytest

from pvlab import settings
from pvlab.errors import SettingsError


def load(tmp_path, text=None, environ=None, overrides=None):
    if text is not None:
        (tmp_path / "pvlab.yml").write_text(text)
    return settings.load(root=tmp_path, environ=environ or {}, overrides=overrides)


def test_defaults_keep_every_network_inside_the_test_range(tmp_path):
    s = load(tmp_path)
    assert s.mgmt_host_address == "198.18.0.1"
    assert s.bridge_address == "198.19.0.1"
    assert s.apt_proxy == "http://198.18.0.1:3142"
    assert s.sources["vm_memory"] == "default"


def test_file_then_environment_then_flag_win_in_that_order(tmp_path):
    s = load(
        tmp_path,
        "vm_memory: 3000\nvm_cpus: 3\ndom0_memory: 1024\n",
        environ={"PVLAB_VM_CPUS": "4"},
        overrides={"dom0_memory": 768},
    )
    assert (s.vm_memory, s.vm_cpus, s.dom0_memory) == (3000, 4, 768)
    assert s.sources["vm_memory"].endswith("pvlab.yml:1")
    assert s.sources["vm_cpus"] == "env PVLAB_VM_CPUS"
    assert s.sources["dom0_memory"] == "flag"


def test_unknown_key_names_its_line(tmp_path):
    with pytest.raises(SettingsError, match=r"pvlab.yml:2: unknown setting 'vm_mem'"):
        load(tmp_path, "vm_cpus: 2\nvm_mem: 3\n")


def test_malformed_file_names_its_line(tmp_path):
    with pytest.raises(SettingsError, match=r"pvlab.yml:2: not valid YAML"):
        load(tmp_path, "vm_cpus: 2\nvm_memory: [3\n")


def test_network_outside_198_18_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="inside 198.18.0.0/15"):
        load(tmp_path, "mgmt_network: 192.168.121.0/24\n")


def test_public_network_needs_a_host_interface(tmp_path):
    with pytest.raises(SettingsError, match="public_network_interface"):
        load(tmp_path, "public_network: true\n")


def test_bad_number_and_choice_are_one_sentence(tmp_path):
    with pytest.raises(SettingsError, match="whole number"):
        load(tmp_path, "vm_cpus: many\n")
    with pytest.raises(SettingsError, match="pvgrub_flavor must be one of"):
        load(tmp_path, "pvgrub_flavor: grub3\n")


def test_unknown_environment_variable_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="PVLAB_BOGUS names no setting"):
        load(tmp_path, environ={"PVLAB_BOGUS": "1"})


def test_legacy_pv_grub_settings_default_to_nothing_named(tmp_path):
    s = load(tmp_path)
    assert s.pvgrub_legacy_sources == ""
    assert s.pvgrub_legacy_images == {}


def test_one_prebuilt_legacy_image_serves_both_variants(tmp_path):
    s = load(tmp_path, "pvgrub_legacy_image_hd00: images/pv-grub-x86_64.gz\n")
    image = tmp_path / "images" / "pv-grub-x86_64.gz"
    assert s.pvgrub_legacy_images == {"hd0": image, "hd00": image}
    assert s.pvgrub_legacy_image_hd0 == ""


def test_two_prebuilt_legacy_images_keep_their_variants(tmp_path):
    s = load(
        tmp_path,
        environ={
            "PVLAB_PVGRUB_LEGACY_IMAGE_HD0": "/srv/hd0.gz",
            "PVLAB_PVGRUB_LEGACY_IMAGE_HD00": "/srv/hd00.gz",
        },
    )
    assert s.pvgrub_legacy_images == {
        "hd0": Path("/srv/hd0.gz"),
        "hd00": Path("/srv/hd00.gz"),
    }


def test_legacy_sources_directory_is_made_absolute_from_the_settings_file(tmp_path):
    s = load(tmp_path, "pvgrub_legacy_sources: extfiles\n")
    assert s.pvgrub_legacy_sources == str(tmp_path / "extfiles")
    assert not s.pvgrub_legacy_sources_is_url


def test_legacy_sources_url_is_kept_as_given(tmp_path):
    s = load(tmp_path, overrides={"pvgrub_legacy_sources": "http://198.18.0.1:8080/x"})
    assert s.pvgrub_legacy_sources == "http://198.18.0.1:8080/x"
    assert s.pvgrub_legacy_sources_is_url


def test_legacy_sources_of_another_scheme_are_refused(tmp_path):
    with pytest.raises(SettingsError, match="must be a directory on this machine"):
        load(tmp_path, "pvgrub_legacy_sources: ftp://example.invalid/extfiles\n")
