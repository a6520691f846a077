"""Legacy PV-GRUB (GRUB 0.97 from Xen's stubdom): prebuilt images are checked before
anything is created, the role's source check names every missing tarball in one
sentence, and guests boot it with the menu.lst path in the xl extra= string."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import lzma
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from pvlab import domain, provision, shell, tasks
from pvlab import settings as settings_mod
from pvlab.errors import DomainError, SettingsError

from helpers import guest_spec, pvkernel

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "pvgrub"
XEN_VERSION = "4.17.5+72-g01140da4e8-1"
TARBALLS = [
    "newlib-1.16.0.tar.gz",
    "zlib-1.2.3.tar.gz",
    "pciutils-2.2.9.tar.bz2",
    "lwip-1.3.0.tar.gz",
    "grub-0.97.tar.gz",
    "polarssl-1.1.4-gpl.tgz",
    "mini-os-4.17.5.tar.gz",
]


def load(tmp_path, text="", **overrides):
    (tmp_path / "pvlab.yml").write_text(text)
    return settings_mod.load(root=tmp_path, environ={}, overrides=overrides)


# ---------------------------------------------------------------- prebuilt images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Candidate pv-grub-x86_64.gz files: the PV test kernel and broken variants."""
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy makes the broken variants of the PV test kernel")
    work = tmp_path_factory.mktemp("pvgrub-images")
    elf = pvkernel.build_pv_test_kernel(work / "build")
    notes = work / "no-notes.elf"
    i386 = work / "i386.elf"
    # The test kernel's Xen notes are its only notes, in one output section.
    subprocess.run(["objcopy", "--remove-section=.notes", elf, notes], check=True)
    subprocess.run(["objcopy", "-O", "elf32-i386", elf, i386], check=True)
    made = {
        "elf": elf,
        "gzip-elf": work / "pv-grub-x86_64.gz",
        "gzip-no-notes": work / "no-notes.gz",
        "gzip-i386": work / "i386.gz",
        "xz-elf": work / "pvtest.xz",
        "text": work / "menu.lst",
        "gzip-text": work / "menu.lst.gz",
        "cut-gzip": work / "cut.gz",
    }
    made["gzip-elf"].write_bytes(gzip.compress(elf.read_bytes()))
    made["gzip-no-notes"].write_bytes(gzip.compress(notes.read_bytes()))
    made["gzip-i386"].write_bytes(gzip.compress(i386.read_bytes()))
    made["xz-elf"].write_bytes(lzma.compress(elf.read_bytes()))
    made["text"].write_text("default 0\ntitle x\nroot (hd0)\n")
    made["gzip-text"].write_bytes(gzip.compress(made["text"].read_bytes()))
    made["cut-gzip"].write_bytes(made["gzip-elf"].read_bytes()[:200])
    return made


@pytest.mark.parametrize("name", ["gzip-elf", "elf"])
def test_gzipped_or_plain_x86_64_xen_pv_elf_is_accepted(images, name):
    kernel = provision.check_legacy_image(images[name], "pvgrub_legacy_image_hd0")
    assert kernel.is_x86_64 and kernel.has_xen_notes


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("text", "neither an ELF image nor a Linux bzImage"),
        ("gzip-text", "gzip-compressed file that is neither an ELF"),
        ("xz-elf", "an xz-compressed ELF, whereas Xen's PV-GRUB image is an ELF"),
        ("cut-gzip", "its gzip data is cut short"),
        ("gzip-i386", "for 32-bit EM_386, not x86_64"),
        ("gzip-no-notes", "without Xen ELF notes"),
    ],
)
def test_unbootable_image_is_one_sentence_naming_setting_and_file(
    images, name, fragment
):
    with pytest.raises(SettingsError) as error:
        provision.check_legacy_image(images[name], "pvgrub_legacy_image_hd00")
    message = str(error.value)
    assert message.startswith(f"pvgrub_legacy_image_hd00 names {images[name]}")
    assert fragment in message
    assert message.endswith(".") and "\n" not in message


def test_missing_or_directory_image_names_the_setting(tmp_path):
    with pytest.raises(SettingsError, match="cannot be read .No such file"):
        provision.check_legacy_image(tmp_path / "nope.gz", "pvgrub_legacy_image_hd0")
    with pytest.raises(SettingsError, match="which is not a file"):
        provision.check_legacy_image(tmp_path, "pvgrub_legacy_image_hd0")


def test_bad_prebuilt_image_stops_provisioning_before_the_host_is_touched(
    tmp_path, images, monkeypatch
):
    touched = []
    monkeypatch.setattr(provision.host, "prepare", lambda *a: touched.append(a))
    s = load(tmp_path, f"pvgrub_legacy_image_hd0: {images['gzip-i386']}\n")
    with pytest.raises(SettingsError, match="pvgrub_legacy_image_hd0"):
        provision.provision(s, progress=lambda message: None)
    assert touched == []


def test_legacy_flavor_without_image_or_sources_stops_before_anything(tmp_path):
    s = load(tmp_path, "pvgrub_flavor: legacy\n")
    with pytest.raises(SettingsError, match="neither pvgrub_legacy_image_hd0 nor"):
        provision.check_pvgrub_settings(s)


def test_one_checked_image_is_installed_for_both_variants(tmp_path, images):
    s = load(tmp_path, f"pvgrub_legacy_image_hd0: {images['gzip-elf']}\n")
    variables = provision.pvgrub_vars(s, XEN_VERSION)
    assert variables["pvgrub_legacy_images"] == {
        "hd0": str(images["gzip-elf"]),
        "hd00": str(images["gzip-elf"]),
    }
    assert variables["pvgrub_legacy_build"] is False
    assert variables["pvgrub_legacy_xen_source"] == []


def test_legacy_flavor_with_sources_builds_from_dom0s_xen_source(
    tmp_path, monkeypatch
):
    source = [tmp_path / f"xen_{XEN_VERSION}.dsc", tmp_path / "xen.orig.tar.xz"]
    monkeypatch.setattr(provision, "xen_source_files", lambda s, v, p: source)
    s = load(tmp_path, "pvgrub_flavor: legacy\npvgrub_legacy_sources: extfiles\n")
    variables = provision.pvgrub_vars(s, XEN_VERSION)
    assert variables["pvgrub_legacy_build"] is True
    assert variables["pvgrub_legacy_sources"] == str(tmp_path / "extfiles")
    assert variables["pvgrub_legacy_xen_release"] == "4.17.5"
    assert variables["pvgrub_legacy_xen_source"] == [str(p) for p in source]


def test_pvgrub2_flavor_builds_no_legacy_pv_grub(tmp_path):
    variables = provision.pvgrub_vars(load(tmp_path), XEN_VERSION)
    assert variables["pvgrub_legacy_build"] is False
    assert variables["pvgrub_legacy_images"] == {}


# ---------------------------------------------------------------- booting it


def spec(**overrides):
    return guest_spec(**{"pvgrub_flavor": "legacy", **overrides})


@pytest.mark.parametrize(
    "variant, root", [("hd0", "(hd0)"), ("hd00", "(hd0,0)")]
)
def test_legacy_xl_config_starts_the_legacy_image_with_the_menu_lst_path(
    variant, root
):
    text = domain.render_xl_config(spec(pvgrub_variant=variant))
    assert f'kernel = "/var/lib/pvlab/pvgrub/legacy-x86_64-{variant}.gz"' in text
    assert f'extra = "{root}/boot/grub/menu.lst"' in text
    assert f"PV-GRUB (legacy, {variant})" in text


def test_legacy_boot_without_an_image_in_dom0_is_refused_before_create(tmp_path):
    guests = domain.Guests(None, load(tmp_path))
    # dom0 as the one survey before a boot sees it: PV-GRUB 2 built, no legacy.
    survey = domain.Survey(
        domains=[], guest_dirs=[], macs={}, free_memory=4096,
        pvgrub_images={"pvgrub2-x86_64-hd0.elf", "pvgrub2-x86_64-hd00.elf"},
    )
    with pytest.raises(DomainError) as error:
        guests.check_new(spec(), survey)
    message = str(error.value)
    assert "dom0 has no legacy PV-GRUB image" in message
    assert "pvgrub_legacy_image_hd0" in message and "pvgrub_legacy_sources" in message
    assert message.endswith(".")


def test_boot_flag_overrides_the_pv_grub_flavor_setting(tmp_path, monkeypatch):
    seen = []

    def boot_image(s, image, **kw):
        seen.append(s.pvgrub_flavor)
        return 0

    monkeypatch.setattr(tasks, "boot_image", boot_image)
    monkeypatch.setattr(
        tasks,
        "_settings",
        lambda **flags: settings_mod.load(root=tmp_path, environ={}, overrides=flags),
    )
    volume = tmp_path / "boot-vol.img"
    volume.write_bytes(b"\0" * 512)
    tasks.boot.body(None, image=str(volume), pvgrub="legacy")
    tasks.boot.body(None, image=str(volume))
    assert seen == ["legacy", "pvgrub2"]


# ---------------------------------------------------------------- the role's check


def ansible_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return env


def run_check(tmp_path, sources: str) -> subprocess.CompletedProcess:
    """The role's legacy_check.yml alone, on this machine: it only stats and asks."""
    playbook = tmp_path / "check.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "all",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "defaults" / "main.yml")],
                    "tasks": [
                        {
                            "name": "Check the legacy PV-GRUB sources.",
                            "ansible.builtin.include_tasks": str(
                                ROLE / "tasks" / "legacy_check.yml"
                            ),
                        }
                    ],
                }
            ]
        )
    )
    variables = tmp_path / "vars.json"
    variables.write_text(
        json.dumps(
            {"pvgrub_legacy_sources": sources, "pvgrub_legacy_xen_release": "4.17.5"}
        )
    )
    return subprocess.run(
        [
            shell.ansible_command("ansible-playbook"),
            "-i", "localhost,", "-c", "local", "-e", f"@{variables}", str(playbook),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ansible_env(),
    )


def test_source_check_only_looks(tmp_path):
    """legacy_check.yml may run before anything is installed: it changes nothing."""
    tasks_ = yaml.safe_load((ROLE / "tasks" / "legacy_check.yml").read_text())
    looking = {
        "ansible.builtin.assert",
        "ansible.builtin.stat",
        "ansible.builtin.uri",
        "ansible.builtin.fail",
    }
    for task in tasks_:
        modules = set(task) & looking
        assert len(modules) == 1, task["name"]
        if "ansible.builtin.uri" in modules:
            assert task["ansible.builtin.uri"]["method"] == "HEAD"


def test_role_names_every_missing_tarball_and_the_setting_in_one_sentence(tmp_path):
    sources = tmp_path / "extfiles"
    sources.mkdir()
    for name in ("newlib-1.16.0.tar.gz", "grub-0.97.tar.gz"):
        (sources / name).write_bytes(b"x")
    # A directory of the right name is not the file.
    (sources / "lwip-1.3.0.tar.gz").mkdir()
    result = run_check(tmp_path, str(sources))
    assert result.returncode != 0
    message = provision.settings_failure(result.stdout.splitlines(keepends=True))
    assert message is not None, result.stdout
    missing = [
        "zlib-1.2.3.tar.gz",
        "pciutils-2.2.9.tar.bz2",
        "lwip-1.3.0.tar.gz",
        "polarssl-1.1.4-gpl.tgz",
        "mini-os-4.17.5.tar.gz",
    ]
    assert message.startswith(", ".join(missing) + " are missing from")
    assert f"pvgrub_legacy_sources ({sources})" in message
    assert "newlib" not in message and "grub-0.97" not in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_role_refuses_a_sources_directory_that_does_not_exist(tmp_path):
    result = run_check(tmp_path, str(tmp_path / "nowhere"))
    message = provision.settings_failure(result.stdout.splitlines())
    assert message == (
        f"pvgrub_legacy_sources names {tmp_path / 'nowhere'}, which is not a "
        "directory on this machine, so the legacy PV-GRUB build has none of "
        + ", ".join(TARBALLS)
        + "; create it with those files, or set pvgrub_legacy_image_hd0 to a "
        "prebuilt pv-grub-x86_64.gz instead."
    )


def test_role_passes_a_complete_sources_directory(tmp_path):
    sources = tmp_path / "extfiles"
    sources.mkdir()
    for name in TARBALLS:
        (sources / name).write_bytes(b"x")
    result = run_check(tmp_path, str(sources))
    assert result.returncode == 0, result.stdout
    assert provision.settings_failure(result.stdout.splitlines()) is None


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving a directory with some of the tarballs."""
    served = tmp_path / "served"
    served.mkdir()
    for name in TARBALLS[:5]:
        (served / name).write_bytes(b"x")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(served)
    )
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_role_asks_a_sources_url_for_each_tarball(tmp_path, loopback_server):
    result = run_check(tmp_path, loopback_server)
    message = provision.settings_failure(result.stdout.splitlines())
    assert message is not None, result.stdout
    assert message.startswith(
        "polarssl-1.1.4-gpl.tgz, mini-os-4.17.5.tar.gz are missing from "
        f"pvgrub_legacy_sources ({loopback_server})"
    )


def test_other_failed_tasks_are_not_taken_for_a_settings_check():
    output = [
        "TASK [xen_host : Install Xen packages.] ****\n",
        'fatal: [dom0]: FAILED! => {"changed": false, "msg": "apt failed"}\n',
    ]
    assert provision.settings_failure(output) is None
