"""-q/--quiet and -v/--verbose on every task, through `invoke` and the `pvlab` command.

Every case runs a task that needs no VM: `settings`, `check`, or a `boot` that the
volume check stops before pvlab contacts dom0.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pvlab.settings import PROJECT_ROOT
from pvlab.tasks import ns

import helpers

pytestmark = pytest.mark.unit

PROGRESS_LINE = re.compile(r"^pvlab \[\s*\d+s\] ", re.M)
CONFIG = PROJECT_ROOT / "tests" / "fixtures" / "aws-test.conf"


def invoke(*args: str) -> subprocess.CompletedProcess:
    return helpers.invoke(*args, timeout=120)


def pvlab(*args: str) -> subprocess.CompletedProcess:
    # The same entry point as the installed `pvlab` console script.
    return subprocess.run(
        [sys.executable, "-c", "from pvlab.cli import main; main()", *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def zero_volume(tmp_path_factory):
    # Holds no filesystem: the check refuses it before anything reaches dom0.
    path = tmp_path_factory.mktemp("vol") / "zeros.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_a_boot_prints_progress_lines_by_default(zero_volume):
    # With --config, boot says which PV-GRUB replaces the kernel, then the check
    # stops it.
    result = invoke("boot", "--config", str(CONFIG), "--image", str(zero_volume))
    assert result.returncode == 1
    assert PROGRESS_LINE.search(result.stdout), result.stdout


@pytest.mark.parametrize("run, flags", [
    (invoke, ("boot", "-q")),
    (invoke, ("boot", "--quiet")),
    (pvlab, ("-q", "boot")),
    (pvlab, ("--quiet", "boot")),
])
def test_quiet_hides_progress_lines_but_keeps_the_error(zero_volume, run, flags):
    result = run(*flags, "--config", str(CONFIG), "--image", str(zero_volume))
    assert result.returncode == 1
    assert not PROGRESS_LINE.search(result.stdout + result.stderr), result.stdout
    assert "pvlab: error:" in result.stderr
    assert "would not boot under PV-GRUB" in result.stderr


def test_quiet_check_still_prints_the_findings_and_the_summary(zero_volume):
    result = invoke("check", "-q", "--image", str(zero_volume))
    assert result.returncode == 1
    assert not PROGRESS_LINE.search(result.stdout)
    assert "holds no filesystem" in result.stderr
    assert f"pvlab: {zero_volume}: 1 errors, 0 warnings" in result.stdout


def test_quiet_settings_prints_the_settings():
    result = pvlab("-q", "settings")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^instance_type\s+\S+", result.stdout, re.M)


@pytest.mark.parametrize("run, flags", [
    (invoke, ("check", "-v")),
    (invoke, ("check", "--verbose")),
    (pvlab, ("-v", "check")),
])
def test_verbose_shows_the_commands_run(zero_volume, run, flags):
    result = run(*flags, "--image", str(zero_volume))
    assert re.search(r"^pvlab: running (sfdisk|blkid) ", result.stderr, re.M), (
        result.stderr
    )


def test_commands_are_not_shown_without_verbose(zero_volume):
    result = invoke("check", "--image", str(zero_volume))
    assert "pvlab: running" not in result.stderr


@pytest.mark.parametrize("run, args", [
    (invoke, ("boot", "-v", "--image", "/nonexistent/boot-vol.img")),
    (pvlab, ("-v", "check")),
])
def test_verbose_error_has_a_traceback_then_the_sentence(run, args):
    result = run(*args)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("pvlab: error:")


def test_error_without_verbose_has_no_traceback():
    result = invoke("boot", "--image", "/nonexistent/boot-vol.img")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("run, args", [
    (invoke, ("settings", "-q", "-v")),
    (invoke, ("check", "--quiet", "--verbose", "--image", "x")),
    (pvlab, ("-q", "-v", "settings")),
    (pvlab, ("-q", "settings", "-v")),
])
def test_quiet_and_verbose_together_are_one_sentence(run, args):
    result = run(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("pvlab: error:")
    ]
    sentence = "-q/--quiet and -v/--verbose exclude each other; give one of them."
    assert errors == [f"pvlab: error: {sentence}"]
    assert result.stdout == ""


@pytest.mark.parametrize("name", sorted(ns.task_names))
def test_every_task_has_quiet_and_verbose_with_help(name):
    result = invoke("--help", name)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+-q, --quiet\s+Print no progress lines", result.stdout, re.M)
    assert re.search(r"^\s+-v, --verbose\s+Show every command run", result.stdout, re.M)


def test_no_other_option_takes_q_or_v():
    for name in ns.task_names:
        for argument in ns[name].get_arguments(ignore_unknown_help=True):
            if argument.name not in ("quiet", "verbose"):
                assert not {"q", "v"} & set(argument.names), (name, argument.names)


def test_pvlab_help_and_list_name_the_global_flags():
    help_text = pvlab("--help").stdout
    assert re.search(r"^\s+-q, --quiet\s+Print no progress lines", help_text, re.M)
    assert re.search(r"^\s+-v, --verbose\s+Show every command run", help_text, re.M)
    assert "Every task also takes -q/--quiet and -v/--verbose" in pvlab("--list").stdout
