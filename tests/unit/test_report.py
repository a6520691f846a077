"""`invoke report`: what the tarball holds, the notes for missing pieces, no secrets.

dom0 is a fake that answers the report's commands with canned output, so every
case runs without a VM.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pvlab import report
from pvlab.domain import Guests
from pvlab.errors import PvlabError, VmError
from pvlab.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.unit

NAME = "web1"
# What an IMDSv2 token from pvlab's emulator looks like: 56 base64url characters.
TOKEN = "Zq3xT0kB7vW9mPq2Lr8sN4yHc6dEa1uJgK5oVfXbYt0Ri7wQeMn3lSpI"
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
REQUEST_LOG = (
    '{"time":"2026-01-01T00:00:00.000Z","method":"PUT","path":"/latest/api/token",'
    '"status":200,"latency_ms":1.2,"source":"198.19.0.10","imds":"v2"}\n'
)


def ok(stdout: str | bytes = b"") -> tuple[int, bytes, bytes]:
    return 0, stdout.encode() if isinstance(stdout, str) else stdout, b""


def running_guest() -> dict[str, tuple[int, bytes, bytes]]:
    """dom0's answers while guest web1 runs, keyed by the start of the command."""
    logs = "/var/log/xen"
    guest = f"/var/lib/pvlab/guests/{NAME}"
    return {
        "xl info": ok("host : dom0\nxen_version : 4.17.5\n"),
        "xl list -l": ok('[{"domid": 3, "config": {"c_info": {"name": "web1"}}}]\n'),
        "xl list": ok("Name ID Mem VCPUs State Time(s)\nweb1 3 256 1 -b---- 1.0\n"),
        "xl dmesg": ok("(XEN) Xen version 4.17.5\n"),
        "ls -1d": ok(f"{logs}/qemu-dm-{NAME}.log\n{logs}/xl-{NAME}.log\n"
                     f"{logs}/xl-{NAME}.log.1\n"),
        f"cat {logs}/xl-{NAME}.log.1": ok("Waiting for domain web1 (domid 2)\n"),
        f"cat {logs}/xl-{NAME}.log": ok("Waiting for domain web1 (domid 3)\n"),
        f"cat {logs}/qemu-dm-{NAME}.log": ok("qdisk backend\n"),
        f"cat {logs}/xen-hotplug.log": ok("RTNETLINK answers: ok\n"),
        "journalctl --no-pager -q SYSLOG_FACILITY=3": ok(
            "root[2276]: /etc/xen/scripts/metadata-fake: online type_if=vif\n"
        ),
        "python3 /opt/pvlab/imds.py log": ok(REQUEST_LOG),
        "journalctl -u pvlab-imds": ok("pvlab-imds: serving on 198.19.0.1:80\n"),
        "if [ -d": ok("1073741824 boot-vol.img\n312 web1.cfg\n90 debug.json\n"
                      "2097152 program.elf\n"),
        f"cat {guest}/web1.cfg": ok('name = "web1"\n'),
        f"cat {guest}/debug.json": ok('{"kernel": "pvtest"}\n'),
        "iptables-save -t nat": ok("*nat\n-A PREROUTING -j pvlab-imds\nCOMMIT\n"),
        "ip -br addr": ok("xenbr0 UP 198.19.0.1/16\n"),
    }


def never_existed() -> dict[str, tuple[int, bytes, bytes]]:
    answers = running_guest()
    answers.update({
        "xl list -l": (1, b"", b"libxl: error: web1 is an invalid domain identifier\n"),
        "ls -1d": ok(),
        "python3 /opt/pvlab/imds.py log": (
            1, b"", b"imds: no request from guest web1 is logged\n"
        ),
        "if [ -d": ok(),
    })
    return answers


@dataclass
class FakeDom0:
    """Answers commands from a table; records every command it was asked to run."""

    answers: dict[str, tuple[int, bytes, bytes]]
    unreachable: bool = False
    commands: list[str] = field(default_factory=list)

    def run(self, command, *, check=True, input=None, timeout=600):
        self.commands.append(command)
        if self.unreachable:
            raise VmError("dom0 cannot be reached over SSH; is the VM running?")
        # The longest matching start wins: `xl list -l` before `xl list`.
        for prefix in sorted(self.answers, key=len, reverse=True):
            if command.startswith(prefix):
                code, out, err = self.answers[prefix]
                return subprocess.CompletedProcess(command, code, out, err)
        return subprocess.CompletedProcess(command, 127, b"", b"sh: not found\n")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache")


def console_log(settings: Settings, text: str) -> None:
    path = Path(settings.cache_dir) / "logs" / f"{NAME}-console.log"
    path.parent.mkdir(parents=True)
    path.write_text(text)


def make_report(tmp_path, settings, dom0) -> tuple[Path, list[report.Entry]]:
    return report.build(Guests(dom0, settings), settings, NAME, str(tmp_path))


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name.split("/", 1)[1]: tar.extractfile(m).read()
            for m in tar.getmembers()
        }


def test_report_of_a_running_guest_holds_every_piece(tmp_path, settings):
    console_log(settings, "pvlab-sample: init started\n")

    path, _ = make_report(tmp_path, settings, FakeDom0(running_guest()))

    assert path.parent == tmp_path
    assert path.name.startswith(f"pvlab-report-{NAME}-")
    assert path.name.endswith(".tar.gz")
    assert set(members(path)) == {
        "README.txt",
        "xen/xl-info.txt", "xen/xl-list.txt", "xen/xl-dmesg.txt",
        f"xen/xl-list-l-{NAME}.json",
        f"logs/xl-{NAME}.log", f"logs/xl-{NAME}.log.1", f"logs/qemu-dm-{NAME}.log",
        "logs/xen-hotplug.log", "logs/hotplug-syslog.txt",
        "guest/console.log",
        "imds/requests.jsonl", "imds/journal.txt",
        f"guest/files/{NAME}.cfg", "guest/files/debug.json",
        "network/iptables-nat.txt", "network/ip-addr.txt",
        "pvlab/settings.txt", "pvlab/version.txt",
    }
    files = members(path)
    assert b"domid 3" in files[f"logs/xl-{NAME}.log"]
    assert files["guest/console.log"] == b"pvlab-sample: init started\n"
    assert files["imds/requests.jsonl"] == REQUEST_LOG.encode()
    assert b"instance_type" in files["pvlab/settings.txt"]
    assert files["pvlab/version.txt"].startswith(b"pvlab 0.1.0\n")


def test_readme_names_the_command_behind_each_file(tmp_path, settings):
    console_log(settings, "console\n")

    path, _ = make_report(tmp_path, settings, FakeDom0(running_guest()))

    text = members(path)["README.txt"].decode()
    for member, source in [
        ("xen/xl-dmesg.txt", "dom0: xl dmesg"),
        (f"xen/xl-list-l-{NAME}.json", f"dom0: xl list -l {NAME}"),
        ("logs/xen-hotplug.log", "dom0: cat /var/log/xen/xen-hotplug.log"),
        ("logs/hotplug-syslog.txt", (
            "dom0: journalctl --no-pager -q SYSLOG_FACILITY=3 "
            "| grep -F /etc/xen/scripts/ | tail -n 500"
        )),
        ("imds/journal.txt", "dom0: journalctl -u pvlab-imds --no-pager -n 500"),
        ("network/iptables-nat.txt", "dom0: iptables-save -t nat"),
        ("guest/console.log", f"host: {settings.cache_dir}/logs/{NAME}-console.log"),
    ]:
        assert f"{member}\n    {source}\n" in text, member


def test_disk_image_and_kernel_are_left_out_with_a_note(tmp_path, settings):
    dom0 = FakeDom0(running_guest())

    path, entries = make_report(tmp_path, settings, dom0)

    left_out = {e.member: e.note for e in entries if not e.included}
    assert "left out: 1073741824 bytes" in left_out["guest/files/boot-vol.img"]
    assert "left out: 2097152 bytes" in left_out["guest/files/program.elf"]
    assert not any("boot-vol.img" in c or "program.elf" in c for c in dom0.commands)
    text = members(path)["README.txt"].decode()
    assert "guest/files/boot-vol.img  (not in the tarball)" in text


def test_a_guest_that_never_existed_still_gives_a_report_with_notes(tmp_path, settings):
    path, entries = make_report(tmp_path, settings, FakeDom0(never_existed()))

    notes = {e.member: e.note for e in entries if e.note}
    assert "no domain web1 exists now" in notes[f"xen/xl-list-l-{NAME}.json"]
    assert "invalid domain identifier" in notes[f"xen/xl-list-l-{NAME}.json"]
    assert "no xl log of web1" in notes[f"logs/xl-{NAME}.log"]
    assert "does not exist" in notes["guest/console.log"]
    assert "no request from guest web1" in notes["imds/requests.jsonl"]
    assert "no files of web1 in dom0" in notes["guest/files/"]
    files = members(path)
    assert {"xen/xl-info.txt", "xen/xl-dmesg.txt", "logs/xen-hotplug.log",
            "imds/journal.txt", "network/ip-addr.txt"} <= set(files)
    assert "guest/console.log" not in files
    text = files["README.txt"].decode()
    assert f"{len(notes)} of {len(entries)} files have a note below." in text
    assert "    note: no domain web1 exists now" in text


def test_unreachable_dom0_is_tried_once_and_noted_for_each_piece(tmp_path, settings):
    console_log(settings, "console\n")
    dom0 = FakeDom0({}, unreachable=True)

    path, entries = make_report(tmp_path, settings, dom0)

    assert len(dom0.commands) == 1
    from_dom0 = [e for e in entries if e.source.startswith("dom0:")]
    assert from_dom0 and all(
        e.note.startswith("not collected: dom0 cannot be reached") for e in from_dom0
    )
    assert {"README.txt", "guest/console.log", "pvlab/settings.txt"} <= set(
        members(path)
    )


def test_a_dom0_that_stops_answering_is_not_waited_for_again(tmp_path, settings):
    dom0 = FakeDom0(running_guest())
    answered = dom0.run

    def hang_at_dmesg(command, **kw):
        if command == "xl dmesg":
            dom0.commands.append(command)
            raise subprocess.TimeoutExpired(command, report.COMMAND_TIMEOUT)
        return answered(command, **kw)

    dom0.run = hang_at_dmesg

    _, entries = make_report(tmp_path, settings, dom0)

    assert dom0.commands == ["xl info", "xl list", "xl dmesg"]
    notes = {e.member: e.note for e in entries}
    assert notes["xen/xl-dmesg.txt"] == (
        f"not collected: dom0 gave no answer within {report.COMMAND_TIMEOUT} s"
    )
    assert notes["network/ip-addr.txt"].startswith("not collected: dom0 gave no")


def test_a_failing_command_keeps_its_output_and_says_why(tmp_path, settings):
    answers = running_guest()
    answers["xl dmesg"] = (1, b"(XEN) partial\n", b"xl: cannot read the ring\n")

    path, entries = make_report(tmp_path, settings, FakeDom0(answers))

    dmesg = next(e for e in entries if e.member == "xen/xl-dmesg.txt")
    assert dmesg.note == "exit status 1: xl: cannot read the ring"
    assert members(path)["xen/xl-dmesg.txt"] == b"(XEN) partial\n"


def test_only_read_only_commands_run_in_dom0(tmp_path, settings):
    dom0 = FakeDom0(running_guest())

    make_report(tmp_path, settings, dom0)

    read_only = ("xl info", "xl list", "xl dmesg", "ls -1d ", "cat ", "if [ -d ",
                 "journalctl ", "iptables-save ", "ip -br addr",
                 "python3 /opt/pvlab/imds.py log ")
    assert dom0.commands
    for command in dom0.commands:
        assert command.startswith(read_only), command
        writes = command.replace("2>/dev/null", "")
        assert not any(w in writes for w in (" rm ", "destroy", "create", ">"))


def test_tokens_and_private_keys_never_reach_the_tarball(tmp_path, settings):
    console_log(
        settings,
        f"curl -H 'X-aws-ec2-metadata-token: {TOKEN}' http://169.254.169.254/\n"
        f"token was {TOKEN}\n{PRIVATE_KEY}",
    )
    answers = running_guest()
    answers["python3 /opt/pvlab/imds.py log"] = ok(
        REQUEST_LOG.replace("/latest/api/token", f"/latest/meta-data/{TOKEN}")
    )
    answers["journalctl -u pvlab-imds"] = ok(
        f'{{"x-aws-ec2-metadata-token": "{TOKEN[:20]}"}}\n'
    )

    path, _ = make_report(tmp_path, settings, FakeDom0(answers))

    for member, data in members(path).items():
        assert TOKEN.encode() not in data, member
        assert TOKEN[:20].encode() not in data, member
        assert b"PRIVATE KEY" not in data, member
        assert b"b3BlbnNzaC1rZXktdjEAAAA" not in data, member
    console = members(path)["guest/console.log"]
    assert b"X-aws-ec2-metadata-token: [token removed]" in console


def test_no_ssh_configuration_or_key_is_read(tmp_path, settings):
    dom0 = FakeDom0(running_guest())

    _, entries = make_report(tmp_path, settings, dom0)

    sources = " ".join(e.source for e in entries) + " ".join(dom0.commands)
    for secret in (".vagrant", "ssh-config", "id_rsa", "private_key", "/.ssh/"):
        assert secret not in sources


@pytest.mark.parametrize("text", [
    "/var/lib/pvlab/guests/web1/web1.cfg",
    "/var/lib/pvlab/guests/a-guest-with-a-long-name-01/debug.json",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "uuid 6a2f41a3-c54c-fce8-32d2-0324e1c32e22",
    "(XEN) Xen version 4.17.5-pre (Debian 4.17.5+23-ga4e5191dc0-1)",
    "x-aws-ec2-metadata-token-ttl-seconds: 21600",
])
def test_scrub_keeps_paths_hashes_and_ordinary_text(text):
    assert report.scrub(text.encode()) == text.encode()


def test_output_directory_gets_the_default_name(tmp_path):
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert report.output_path(str(tmp_path), NAME, created) == (
        tmp_path / "pvlab-report-web1-20260102T030405Z.tar.gz"
    )
    assert report.output_path(None, NAME, created) == (
        Path.cwd() / "pvlab-report-web1-20260102T030405Z.tar.gz"
    )
    assert report.output_path(str(tmp_path / "r.tgz"), NAME, created) == (
        tmp_path / "r.tgz"
    )


def test_output_in_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(PvlabError, match="does not exist"):
        report.output_path(str(tmp_path / "no" / "r.tgz"), NAME, datetime.now(UTC))


def test_report_task_without_a_name_is_one_sentence():
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "report"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pvlab: error: name the guest to report on with --name NAME "
        "(see `invoke list`)."
    )
