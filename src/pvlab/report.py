"""Bundle what a bug report about one guest needs into a tar.gz: Xen's state and logs,
the guest's logs and files in dom0, the metadata service's logs and pvlab's settings.

Nothing secret goes in: no disk image, no user-data, no SSH key or SSH
configuration, and every file is scrubbed of IMDSv2 tokens and private keys.
"""

from __future__ import annotations

import io
import logging
import platform
import re
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import invoke

from pvlab import __version__, shell
from pvlab.domain import GUESTS_DIR, Guests
from pvlab.errors import PvlabError, VmError
from pvlab.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

XEN_LOG_DIR = "/var/log/xen"
HOTPLUG_SCRIPTS = "/etc/xen/scripts"
IMDS_UNIT = "pvlab-imds"
JOURNAL_LINES = 500
COMMAND_TIMEOUT = 120
# A guest's files in dom0 that are its disk, its kernel or its memory: large, and
# the user has them already.
BULKY_FILES = re.compile(r"boot-vol\.img|program\.elf|core\..*")
MAX_FILE_BYTES = 1024 * 1024

_TOKEN_HEADER = re.compile(
    rb"(?i)(x-aws-ec2-metadata-token[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"
)
_PRIVATE_KEY = re.compile(
    rb"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?"
    rb"(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.S,
)
# A long run of base64 characters: what IMDSv2 tokens (and most other secrets) look
# like, also inside a URL path a guest asked for.
_TOKEN_LIKE = re.compile(rb"[A-Za-z0-9+/_-]{40,}={0,2}")


@dataclass
class Entry:
    """One file of the report: its path in the tarball, what produced it, and a
    note when that failed or something was left out."""

    member: str
    source: str
    data: bytes = b""
    note: str = ""

    @property
    def included(self) -> bool:
        # A command that ran fine but printed nothing is a finding too.
        return bool(self.data) or not self.note


class PieceFailed(Exception):
    """A piece could not be collected whole; data holds what there is of it."""

    def __init__(self, note: str, data: bytes = b"") -> None:
        super().__init__(note)
        self.data = data


@dataclass
class Collector:
    """Collects the pieces; once dom0 proves unreachable, its remaining pieces are
    noted at once instead of each waiting for SSH to fail."""

    guests: Guests
    unreachable: str = ""

    def piece(
        self,
        member: str,
        source: str,
        produce: Callable[[], bytes],
        in_dom0: bool = True,
    ) -> Entry:
        entry = Entry(member, source)
        if in_dom0 and self.unreachable:
            entry.note = f"not collected: {self.unreachable}"
            return entry
        try:
            entry.data = produce()
        except PieceFailed as exc:
            entry.data, entry.note = exc.data, str(exc)
        except VmError as exc:
            self.unreachable = str(exc)
            entry.note = f"not collected: {exc}"
        except PvlabError as exc:
            entry.note = str(exc)
        except subprocess.TimeoutExpired:
            # A dom0 this slow would hold every other piece up as long.
            self.unreachable = f"dom0 gave no answer within {COMMAND_TIMEOUT} s"
            entry.note = f"not collected: {self.unreachable}"
        except OSError as exc:
            entry.note = f"not collected: {exc.strerror or exc}"
        return entry

    def run(self, command: str) -> bytes:
        """What a read-only command prints in dom0 (as root); a non-zero exit fails."""
        result = self.guests.dom0.run(
            command, check=False, input=b"", timeout=COMMAND_TIMEOUT
        )
        if result.returncode != 0:
            raise PieceFailed(
                f"exit status {result.returncode}: {_last_line(result.stderr)}",
                result.stdout,
            )
        return result.stdout

    def command(self, member: str, command: str, failed: str = "") -> Entry:
        """An entry holding what a command in dom0 prints; failed explains a
        non-zero exit."""
        entry = self.piece(member, f"dom0: {command}", lambda: self.run(command))
        if failed and entry.note.startswith("exit status"):
            entry.note = f"{failed} ({entry.note})"
        return entry


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


# ------------------------------------------------------------------------ the pieces


def _xen(c: Collector) -> list[Entry]:
    return [
        c.command("xen/xl-info.txt", "xl info"),
        c.command("xen/xl-list.txt", "xl list"),
        c.command("xen/xl-dmesg.txt", "xl dmesg"),
    ]


def _domain(c: Collector, name: str) -> list[Entry]:
    return [
        c.command(
            f"xen/xl-list-l-{name}.json",
            f"xl list -l {shlex.quote(name)}",
            failed=f"no domain {name} exists now, so xl knows nothing of it",
        )
    ]


def _xen_logs(c: Collector, name: str) -> list[Entry]:
    q = shlex.quote(name)
    pattern = f"{XEN_LOG_DIR}/xl-{q}.log* {XEN_LOG_DIR}/qemu-dm-{q}.log*"
    # A listing only decides which files to fetch; it is no file of the report.
    listing = c.command("", f"ls -1d {pattern} 2>/dev/null || true")
    entries = []
    if listing.note:
        entries.append(
            Entry(f"logs/xl-{name}.log", f"dom0: {pattern}", note=listing.note)
        )
    elif not listing.data.strip():
        entries.append(Entry(
            f"logs/xl-{name}.log",
            f"dom0: {pattern}",
            note=f"no xl log of {name} in {XEN_LOG_DIR}; xl writes one when it "
            "creates the domain",
        ))
    for path in listing.data.decode(errors="replace").split():
        entries.append(c.command(f"logs/{Path(path).name}", f"cat {shlex.quote(path)}"))
    entries.append(
        c.command("logs/xen-hotplug.log", f"cat {XEN_LOG_DIR}/xen-hotplug.log")
    )
    # Xen's hotplug scripts, metadata-fake among them, log through the system
    # logger as "daemon" lines that start with the script's path.
    entries.append(c.command(
        "logs/hotplug-syslog.txt",
        f"journalctl --no-pager -q SYSLOG_FACILITY=3 | grep -F {HOTPLUG_SCRIPTS}/ "
        f"| tail -n {JOURNAL_LINES}",
    ))
    return entries


def _console(c: Collector, settings: Settings, name: str) -> list[Entry]:
    path = Path(settings.cache_dir) / "logs" / f"{name}-console.log"

    def read() -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PieceFailed(
                f"{path} does not exist; `invoke boot` writes it while it streams "
                f"the console of {name} (a --paused or --debug boot has none)"
            ) from None

    return [c.piece("guest/console.log", f"host: {path}", read, in_dom0=False)]


def _imds(c: Collector, name: str) -> list[Entry]:
    requests = c.piece(
        "imds/requests.jsonl",
        f"dom0: {c.guests.imds_command('log', name)}",
        lambda: c.guests.imds("log", name).encode(),
    )
    journal = c.command(
        "imds/journal.txt",
        f"journalctl -u {IMDS_UNIT} --no-pager -n {JOURNAL_LINES}",
    )
    return [requests, journal]


def _guest_files(c: Collector, name: str) -> list[Entry]:
    guest_dir = f"{GUESTS_DIR}/{name}"
    q = shlex.quote(guest_dir)
    listing = c.command(
        "", f"if [ -d {q} ]; then find {q} -maxdepth 1 -type f -printf '%s %f\\n'; fi"
    )
    if listing.note:
        return [Entry("guest/files/", f"dom0: {guest_dir}/", note=listing.note)]
    files = [
        line.split(" ", 1)
        for line in listing.data.decode(errors="replace").splitlines()
        if " " in line
    ]
    if not files:
        return [Entry(
            "guest/files/",
            f"dom0: {guest_dir}/",
            note=f"no files of {name} in dom0; pvlab removes them when it destroys "
            "the guest",
        )]
    entries = []
    for size, filename in sorted(files, key=lambda f: f[1]):
        path = f"{guest_dir}/{filename}"
        member = f"guest/files/{filename}"
        if BULKY_FILES.fullmatch(filename) or int(size) > MAX_FILE_BYTES:
            entries.append(Entry(
                member, f"dom0: {path}", note=f"left out: {size} bytes of disk "
                "image, kernel or memory, which you have already or can recreate",
            ))
        else:
            entries.append(c.command(member, f"cat {shlex.quote(path)}"))
    return entries


def _network(c: Collector) -> list[Entry]:
    return [
        c.command("network/iptables-nat.txt", "iptables-save -t nat"),
        c.command("network/ip-addr.txt", "ip -br addr"),
    ]


def _pvlab(c: Collector, settings: Settings) -> list[Entry]:
    settings_text = "".join(f"{line}\n" for line in settings.describe()).encode()
    return [
        Entry("pvlab/settings.txt", "host: invoke settings", settings_text),
        c.piece("pvlab/version.txt", "host: pvlab, Python, Invoke, git describe",
                _versions, in_dom0=False),
    ]


def _versions() -> bytes:
    described = shell.run(
        ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
        check=False,
    )
    checkout = described.stdout.strip() if described.returncode == 0 else (
        "not a git checkout"
    )
    return (
        f"pvlab {__version__}\n"
        f"checkout {checkout}\n"
        f"python {platform.python_version()}\n"
        f"invoke {invoke.__version__}\n"
        f"host {platform.platform()}\n"
    ).encode()


# ----------------------------------------------------------------------- the tarball


def collect(
    guests: Guests, settings: Settings, name: str, progress=log.info
) -> list[Entry]:
    """Every piece of the report on this guest, in the order of the README."""
    c = Collector(guests)
    steps: list[tuple[str, Callable[[], list[Entry]]]] = [
        ("Xen: xl info, xl list, xl dmesg", lambda: _xen(c)),
        (f"the domain {name}: xl list -l", lambda: _domain(c, name)),
        (f"xl and hotplug logs of {name}", lambda: _xen_logs(c, name)),
        (f"console log of {name} on this host", lambda: _console(c, settings, name)),
        ("the metadata service: request log and journal", lambda: _imds(c, name)),
        (f"files of {name} in dom0", lambda: _guest_files(c, name)),
        ("network: NAT table and addresses", lambda: _network(c)),
        ("pvlab: settings and version", lambda: _pvlab(c, settings)),
    ]
    entries: list[Entry] = []
    for label, step in steps:
        progress(f"report: {label}")
        entries += step()
    return entries


def scrub(data: bytes) -> bytes:
    """data without private keys, IMDSv2 token headers or token-like strings."""
    data = _PRIVATE_KEY.sub(b"[private key removed]", data)
    data = _TOKEN_HEADER.sub(rb"\1[token removed]", data)
    return _TOKEN_LIKE.sub(_scrub_token_like, data)


def _scrub_token_like(match: re.Match) -> bytes:
    text = match.group()
    # Only with both cases and digits: hex hashes, UUIDs and paths stay.
    mixed = all(re.search(kind, text) for kind in (rb"[A-Z]", rb"[a-z]", rb"[0-9]"))
    return b"[token-like string removed]" if mixed else text


def readme(entries: list[Entry], name: str, created: datetime) -> bytes:
    noted = [e for e in entries if e.note]
    lines = [
        f"pvlab report on guest {name}",
        f"made {created:%Y-%m-%d %H:%M:%S} UTC by pvlab {__version__}",
        "",
        "Each file and what produced it: `dom0:` a command run as root in the dom0",
        "VM (or a file read there), `host:` the machine that ran `invoke report`.",
        "Secrets are kept out: no disk image, user-data or SSH key, and IMDSv2",
        "tokens and token-like strings are replaced by a marker.",
        f"{len(noted)} of {len(entries)} files have a note below.",
        "",
    ]
    for entry in entries:
        state = "" if entry.included else "  (not in the tarball)"
        lines.append(f"{entry.member}{state}")
        lines.append(f"    {entry.source}")
        if entry.note:
            lines.append(f"    note: {entry.note}")
    return ("\n".join(lines) + "\n").encode()


def write_tarball(
    entries: list[Entry], path: Path, top: str, created: datetime, name: str
) -> None:
    """The README and every collected entry under top/, scrubbed, as path."""
    members = [("README.txt", readme(entries, name, created))]
    members += [(e.member, e.data) for e in entries if e.included]
    part = path.with_name(f"{path.name}.part")
    with tarfile.open(part, "w:gz") as tar:
        for member, data in members:
            clean = scrub(data)
            info = tarfile.TarInfo(f"{top}/{member}")
            info.size = len(clean)
            info.mtime = int(created.timestamp())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(clean))
    part.replace(path)


def report_stem(name: str, created: datetime) -> str:
    return f"pvlab-report-{name}-{created:%Y%m%dT%H%M%SZ}"


def output_path(output: str | None, name: str, created: datetime) -> Path:
    """Where the tarball goes: output, a file in the directory output, or the
    default name in the current directory."""
    default = f"{report_stem(name, created)}.tar.gz"
    if not output:
        return Path.cwd() / default
    path = Path(output).expanduser()
    if path.is_dir():
        return path / default
    if not path.parent.is_dir():
        raise PvlabError(
            f"--output {output}: directory {path.parent} does not exist; create it "
            "or give a path in an existing directory."
        )
    return path


def build(
    guests: Guests,
    settings: Settings,
    name: str,
    output: str | None = None,
    progress=log.info,
) -> tuple[Path, list[Entry]]:
    """Collect the report on this guest and write it; returns its path and entries."""
    created = datetime.now(UTC)
    path = output_path(output, name, created)
    entries = collect(guests, settings, name, progress)
    progress(f"report: writing {path}")
    write_tarball(entries, path, report_stem(name, created), created, name)
    return path, entries
