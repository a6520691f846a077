"""Bad input on the command line: one clear sentence, exit status 1, no traceback.

Every case here is refused before pvlab contacts dom0, so nothing can have been
created.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pvlab.settings import PROJECT_ROOT

import helpers


def invoke(*args: str, env=None) -> subprocess.CompletedProcess:
    return helpers.invoke(*args, timeout=120, env=env)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    # Any existing file passes the early argument checks below.
    path = tmp_path_factory.mktemp("vol") / "boot-vol.img"
    path.write_bytes(b"\0" * 4096)
    return path


def assert_one_sentence(result, fragment):
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("pvlab: error:")
    ]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]
    assert errors[0].rstrip().endswith(".")


@pytest.mark.parametrize("args, fragment", [
    (["boot"], "--image PATH"),
    (["boot", "--image", "/nonexistent/boot-vol.img"], "does not exist"),
    (["boot", "--image", "/"], "is a directory"),
    (["check"], "--image PATH"),
    (["destroy"], "--name NAME"),
    (["metadata", "--name", "x"], "exactly one of"),
    (["test", "--tier", "smoke"], "unknown tier"),
])
def test_missing_or_wrong_arguments_are_one_sentence(args, fragment):
    assert_one_sentence(invoke(*args), fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--name", "bad name!"], "is not valid"),
    (["--name", "x" * 70], "is not valid"),
    (["--instance-type", "t2.micro"], "HVM only"),
    (["--instance-type", "q9.tiny"], "unknown instance type"),
    (["--env", "NOEQUALS"], "KEY=VALUE"),
    (["--env", "A=1", "--env", "A=2"], "given twice"),
    (["--user-data", "/nonexistent/ud.json"], "cannot be read"),
    (["--memory", "lots"], "--memory must be a number"),
    (["--mac", "00:16:3e:zz:00:01"], "is malformed"),
    (["--mac", "01:00:5e:00:00:01"], "multicast"),
    (["--pvgrub", "grub3"], "--pvgrub must be legacy or pvgrub2"),
])
def test_bad_boot_options_are_refused_before_anything_is_created(
    volume, extra, fragment
):
    assert_one_sentence(invoke("boot", "--image", str(volume), *extra), fragment)


def test_oversized_user_data_is_refused_like_ec2(volume, tmp_path):
    big = tmp_path / "ud"
    big.write_bytes(b"x" * (16 * 1024 + 1))
    assert_one_sentence(
        invoke("boot", "--image", str(volume), "--user-data", str(big)), "16 KiB"
    )


def test_empty_volume_is_not_a_filesystem(tmp_path):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    result = invoke("check", "--image", str(empty))
    assert result.returncode == 1
    assert "empty" in result.stderr



def test_unknown_setting_in_the_environment_is_one_sentence():
    env = dict(os.environ, PVLAB_BOGUS_KNOB="1")
    assert_one_sentence(
        invoke("settings", env=env), "PVLAB_BOGUS_KNOB names no setting"
    )


def test_public_network_without_a_host_interface_is_one_sentence():
    env = dict(os.environ, PVLAB_PUBLIC_NETWORK="yes")
    assert_one_sentence(invoke("settings", env=env), "public_network_interface")


@pytest.mark.skipif(shutil.which("VBoxManage") is not None, reason="VirtualBox is here")
def test_virtualbox_provider_without_virtualbox_is_refused_before_anything():
    env = dict(os.environ, PVLAB_PROVIDER="virtualbox", PVLAB_BOX_BUILD="no",
               PVLAB_BOX_NAME="pvlab/debian12")
    vagrant_dir = PROJECT_ROOT / ".vagrant" / "machines"
    before = sorted(vagrant_dir.rglob("*")) if vagrant_dir.exists() else []

    result = invoke("provision", env=env)

    assert_one_sentence(result, "VirtualBox is not installed")
    after = sorted(vagrant_dir.rglob("*")) if vagrant_dir.exists() else []
    assert after == before


def test_missing_box_with_box_build_off_is_refused_before_anything(tmp_path):
    env = dict(os.environ, PVLAB_BOX_BUILD="no", PVLAB_BOX_NAME="pvlab/absent",
               VAGRANT_HOME=str(tmp_path / "vagrant.d"))

    result = invoke("provision", env=env)

    assert_one_sentence(result, "box pvlab/absent for libvirt is not added")
    assert not (tmp_path / "vagrant.d").exists()


@pytest.mark.parametrize("line, fragment", [
    ("lab ansible_host=127.0.0.1", "is this machine"),
    ("lab ansible_connection=local", "local connection"),
    ("lab ansible_host=localhost", "is this machine"),
])
def test_an_inventory_naming_this_machine_is_refused(tmp_path, line, fragment):
    path = tmp_path / "lab.ini"
    path.write_text(f"[xen_hosts]\n{line}\n")

    assert_one_sentence(invoke("provision", "--inventory", str(path)), fragment)


def test_an_inventory_without_xen_hosts_is_refused(tmp_path):
    path = tmp_path / "lab.ini"
    path.write_text("[web]\nweb1 ansible_host=198.18.9.9\n")

    assert_one_sentence(
        invoke("provision", "--inventory", str(path)), "no hosts in a [xen_hosts]"
    )


def test_host_without_an_inventory_is_one_sentence(volume):
    assert_one_sentence(
        invoke("list", "--host", "lab"), "needs an inventory"
    )
