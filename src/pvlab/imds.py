"""Emulate EC2's instance metadata service (IMDS) for the PV guests on dom0's bridge.

It runs inside dom0 as one standard-library-only file (`python3 imds.py serve`) and
answers each guest, identified by the source address of its request, as EC2 would.

State directory (default /var/lib/pvlab/imds)::

    guests/<name>.json   one registration per guest, written by `register`
    logs/<name>.jsonl    request log of that guest (logs/_unregistered.jsonl for
                         addresses that are not a registered guest)
    control.sock         where root in dom0 registers and forgets guests through
                         the running service (see "control socket" below)

A registration file is one JSON object (schema 1)::

    {"schema": 1, "name": "web1", "mac": "00:16:3e:00:00:0a", "ip": "198.19.0.10",
     "instance_id": "i-...", "reservation_id": "r-...", "instance_type": "m1.small",
     "user_data_b64": "e30=" or null, "http_tokens": "optional" or "required",
     "hop_limit": 1, "pvgrub_variant": "hd0" or "hd00",
     "registered_at": "2024-01-01T00:00:00Z",
     "spot_interruption": null or {"action": "terminate", "time": "...Z"},
     "scheduled_events": [{"Code": ..., "Description": ..., "EventId": ...,
                           "NotBefore": ..., "NotAfter": ..., "State": ...}],
     "imported_meta_data": null or an import tree (below)}

Writers replace it atomically (temporary file, then rename) under an flock on
<state dir>/.lock; the server rescans guests/ when its modification time changes.

Import format (`import --name N FILE`, produced by scripts/imds-capture.py on a real
instance): one JSON object that mirrors /latest/meta-data/. An object is a directory,
a string is a leaf, keys are the names EC2 lists without the trailing "/"; a key
written "0=my-key" (as under public-keys/) is listed verbatim and addressed by the
part before "=". Example::

    {"ami-id": "ami-0123456789abcdef0", "instance-type": "t1.micro",
     "placement": {"availability-zone": "eu-west-1b", "region": "eu-west-1"},
     "public-keys": {"0=my-key": {"openssh-key": "ssh-ed25519 AAAA... me"}}}

Imported leaves replace the emulator's and add to its tree, except what the
emulator owns so that the guest stays reachable and consistent: mac, local-ipv4,
local-hostname, hostname, iam/ (credentials are never replayed), events/, spot/ and
the guest's own network/interfaces/macs/<mac>/{mac,local-ipv4s,local-hostname,
device-number}. The primary imported interface's other leaves (vpc-id, subnet-id,
...) move to the guest's MAC. public-keys/ is replaced as a whole.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import email.utils
import fcntl
import hashlib
import http
import io
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/pvlab/imds")
DEFAULT_CONFIG = Path("/etc/pvlab/imds.json")
UNREGISTERED_LOG = "_unregistered"

USER_DATA_LIMIT = 16 * 1024  # EC2 limit on raw user-data, before base64
TOKEN_TTL_RANGE = (1, 21600)
HOP_LIMIT_RANGE = (1, 64)
HTTP_TOKENS = ("optional", "required")
PVGRUB_VARIANTS = ("hd0", "hd00")
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SCHEDULED_EVENT_CODES = {
    "instance-reboot": "The instance is scheduled for a reboot",
    "system-reboot": "The instance is scheduled for a reboot of its host",
    "system-maintenance": "The instance is scheduled for host maintenance",
    "instance-retirement": "The instance is scheduled for retirement",
    "instance-stop": "The instance is scheduled to stop",
}

TOKEN_HEADER = "x-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"

# Metadata versions EC2 lists at GET /; each serves the same (latest) tree here.
API_VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01",
    "2012-01-12", "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19",
    "2016-06-30", "2016-09-02", "2018-03-28", "2018-08-17", "2018-09-24",
    "2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23", "2021-07-15",
    "2022-09-24", "latest",
)  # fmt: skip

# AWS's x86_64 PV-GRUB AKIs (pv-grub-hd0_1.04 / pv-grub-hd00_1.04) per region.
# Limitation: AWS published no hd00 AKI for the regions missing below that we
# could confirm; kernel-id is then absent, as on an instance without a kernel.
PVGRUB_AKIS: dict[str, dict[str, str]] = {
    "hd0": {
        "ap-northeast-1": "aki-176bf516", "ap-northeast-2": "aki-01a66b6f",
        "ap-south-1": "aki-a7305ac8", "ap-southeast-1": "aki-503e7402",
        "ap-southeast-2": "aki-c362fff9", "ca-central-1": "aki-320ebd56",
        "eu-central-1": "aki-184c7a05", "eu-west-1": "aki-52a34525",
        "eu-west-2": "aki-8b6369ef", "sa-east-1": "aki-5553f448",
        "us-east-1": "aki-919dcaf8", "us-east-2": "aki-da055ebf",
        "us-gov-west-1": "aki-1de98d3e", "us-west-1": "aki-880531cd",
        "us-west-2": "aki-fc8f11cc",
    },
    "hd00": {
        "ap-northeast-1": "aki-1f6bf51e", "ap-southeast-1": "aki-5e3e740c",
        "ap-southeast-2": "aki-3b1d8001", "eu-west-1": "aki-58a3452f",
        "sa-east-1": "aki-5153f44c", "us-east-1": "aki-499ccb20",
        "us-gov-west-1": "aki-61e98d42", "us-west-1": "aki-920531d7",
        "us-west-2": "aki-e68f11d6",
    },
}  # fmt: skip

# PV-GRUB hd0 boots an unpartitioned volume, hd00 the first partition of a disk.
ROOT_DEVICES = {"hd0": "/dev/sda1", "hd00": "/dev/sda"}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_INSTANCE_ID_RE = re.compile(r"i-([0-9a-f]{8}|[0-9a-f]{17})")
_INSTANCE_TYPE_RE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d")
_HTTP_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")  # ASCII only: "²".isdigit() is true
_ROLE_RE = re.compile(r"[\w+=,.@-]{1,64}")
_KEY_NAME_RE = re.compile(r"[^/=\x00-\x1f\x7f]{1,255}")


class ImdsError(Exception):
    """A mistake in a command line, config or state file; one sentence with the fix."""

    exit_code = 2


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GuestDefaults:
    """What `register` uses when a flag is not given."""

    instance_type: str = "m1.small"
    http_tokens: str = "optional"
    hop_limit: int = 1
    pvgrub_variant: str = "hd0"


@dataclass(frozen=True)
class Settings:
    """Service-wide values every guest shares (the config file)."""

    region: str = "us-east-1"
    availability_zone: str = ""  # empty: the region's zone "a"
    ami_id: str = "ami-0123456789abcdef0"
    account_id: str = "123456789012"
    iam_role: str | None = "pvlab-instance-role"  # null: no iam/ category
    ssh_key_name: str = "pvlab"
    ssh_public_key: str | None = None  # null: public-keys/ 404s, as on EC2
    security_groups: tuple[str, ...] = ("default",)
    vpc_cidr: str = "198.19.0.0/16"
    subnet_cidr: str = "198.19.0.0/16"
    guest_defaults: GuestDefaults = field(default_factory=GuestDefaults)

    @property
    def zone(self) -> str:
        return self.availability_zone or f"{self.region}a"

    @classmethod
    def load(cls, path: Path | None) -> Settings:
        """Read the config file; `None` means the default path, which may be absent."""
        explicit = path is not None
        path = path or DEFAULT_CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if explicit:
                raise ImdsError(
                    f"config file {path} does not exist; create it or drop --config"
                ) from None
            return cls()
        except (OSError, ValueError) as exc:
            raise ImdsError(
                f"config file {path} is not readable JSON ({exc}); fix its syntax"
            ) from None
        if not isinstance(data, dict):
            raise ImdsError(f"config file {path} must hold one JSON object")
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], origin: str = "config") -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ImdsError(
                f"{origin} has unknown key {unknown[0]!r}; "
                f"valid keys are {', '.join(sorted(known))}"
            )
        values = dict(data)
        for key in (
            "region",
            "availability_zone",
            "ami_id",
            "account_id",
            "ssh_key_name",
            "vpc_cidr",
            "subnet_cidr",
        ):
            if key in values and not isinstance(values[key], str):
                raise ImdsError(f"{origin}: {key} must be a string")
        for key in ("iam_role", "ssh_public_key"):
            if key in values and not isinstance(values[key], (str, type(None))):
                raise ImdsError(f"{origin}: {key} must be a string or null")
        if "security_groups" in values:
            groups = values["security_groups"]
            if not (
                isinstance(groups, list)
                and groups
                and all(isinstance(g, str) and g for g in groups)
            ):
                raise ImdsError(f"{origin}: security_groups must be a list of names")
            values["security_groups"] = tuple(groups)
        if "guest_defaults" in values:
            values["guest_defaults"] = _guest_defaults(values["guest_defaults"], origin)
        settings = cls(**values)
        settings.validate(origin)
        return settings

    def validate(self, origin: str = "config") -> None:
        if not _REGION_RE.fullmatch(self.region):
            raise ImdsError(f"{origin}: region {self.region!r} is not like us-east-1")
        if not self.zone.startswith(self.region) or len(self.zone) <= len(self.region):
            raise ImdsError(
                f"{origin}: availability_zone {self.zone!r} must be a zone of "
                f"{self.region}, e.g. {self.region}a"
            )
        # Both become path names in the tree, so "/" would break it.
        if self.iam_role is not None and not _ROLE_RE.fullmatch(self.iam_role):
            raise ImdsError(
                f"{origin}: iam_role {self.iam_role!r} is not an IAM role name "
                "(1-64 of letters, digits and +=,.@_-)"
            )
        if not _KEY_NAME_RE.fullmatch(self.ssh_key_name):
            raise ImdsError(
                f"{origin}: ssh_key_name {self.ssh_key_name!r} must be printable and "
                "free of '/' and '='"
            )
        if not re.fullmatch(r"\d{12}", self.account_id):
            raise ImdsError(f"{origin}: account_id must be 12 digits")
        for key in ("vpc_cidr", "subnet_cidr"):
            try:
                ipaddress.IPv4Network(getattr(self, key))
            except ValueError:
                raise ImdsError(f"{origin}: {key} must be an IPv4 network") from None


def _guest_defaults(data: Any, origin: str) -> GuestDefaults:
    if not isinstance(data, dict):
        raise ImdsError(f"{origin}: guest_defaults must be a JSON object")
    known = {f.name for f in dataclasses.fields(GuestDefaults)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ImdsError(f"{origin}: guest_defaults has unknown key {unknown[0]!r}")
    defaults = GuestDefaults(**data)
    _check_guest_options(
        defaults.instance_type,
        defaults.http_tokens,
        defaults.hop_limit,
        defaults.pvgrub_variant,
        f"{origin}: guest_defaults",
    )
    return defaults


def _check_guest_options(
    instance_type: Any, http_tokens: Any, hop_limit: Any, variant: Any, origin: str
) -> None:
    if not isinstance(instance_type, str) or not _INSTANCE_TYPE_RE.fullmatch(
        instance_type
    ):
        raise ImdsError(
            f"{origin}: instance type {instance_type!r} is not like m1.small"
        )
    if http_tokens not in HTTP_TOKENS:
        raise ImdsError(f"{origin}: http tokens must be optional or required")
    low, high = HOP_LIMIT_RANGE
    if not isinstance(hop_limit, int) or not low <= hop_limit <= high:
        raise ImdsError(f"{origin}: hop limit must be an integer from {low} to {high}")
    if variant not in PVGRUB_VARIANTS:
        raise ImdsError(f"{origin}: PV-GRUB variant must be hd0 or hd00")


# ----------------------------------------------------------------------------- guests


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex_id(*parts: str, length: int = 17) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def normalise_mac(mac: str) -> str:
    value = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(value):
        raise ImdsError(f"MAC address {mac!r} is not like 00:16:3e:12:34:56")
    return value


def _check_ipv4(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip.strip()))
    except ValueError:
        raise ImdsError(f"IP address {ip!r} is not an IPv4 address") from None


@dataclass(frozen=True)
class Guest:
    """One registered guest: what EC2 would know about the instance."""

    name: str
    mac: str
    ip: str
    instance_id: str
    reservation_id: str
    instance_type: str = "m1.small"
    user_data: bytes | None = b"{}"
    http_tokens: str = "optional"
    hop_limit: int = 1
    pvgrub_variant: str = "hd0"
    registered_at: str = ""
    spot_interruption: dict[str, str] | None = None
    scheduled_events: tuple[dict[str, str], ...] = ()
    imported_meta_data: dict[str, Any] | None = None

    @staticmethod
    def default_instance_id(name: str, mac: str) -> str:
        return f"i-{_hex_id('instance', name, mac)}"

    def to_json(self) -> dict[str, Any]:
        user_data = None
        if self.user_data is not None:
            user_data = base64.b64encode(self.user_data).decode("ascii")
        return {
            "schema": 1,
            "name": self.name,
            "mac": self.mac,
            "ip": self.ip,
            "instance_id": self.instance_id,
            "reservation_id": self.reservation_id,
            "instance_type": self.instance_type,
            "user_data_b64": user_data,
            "http_tokens": self.http_tokens,
            "hop_limit": self.hop_limit,
            "pvgrub_variant": self.pvgrub_variant,
            "registered_at": self.registered_at,
            "spot_interruption": self.spot_interruption,
            "scheduled_events": list(self.scheduled_events),
            "imported_meta_data": self.imported_meta_data,
        }

    @classmethod
    def from_json(cls, data: Any) -> Guest:
        """Parse a registration file; raises ValueError (or ImdsError) if malformed."""
        if not isinstance(data, dict) or data.get("schema") != 1:
            raise ValueError("not a schema 1 guest registration")
        if not _NAME_RE.fullmatch(str(data.get("name"))):
            raise ValueError("its name is not a valid guest name")
        if not isinstance(data.get("spot_interruption") or {}, dict) or not all(
            isinstance(e, dict) for e in data.get("scheduled_events") or ()
        ):
            raise ValueError("its events are malformed")
        user_data = data.get("user_data_b64")
        guest = cls(
            name=str(data["name"]),
            mac=normalise_mac(str(data["mac"])),
            ip=_check_ipv4(str(data["ip"])),
            instance_id=str(data["instance_id"]),
            reservation_id=str(data["reservation_id"]),
            instance_type=str(data.get("instance_type", "m1.small")),
            user_data=None if user_data is None else base64.b64decode(user_data),
            http_tokens=str(data.get("http_tokens", "optional")),
            hop_limit=int(data.get("hop_limit", 1)),
            pvgrub_variant=str(data.get("pvgrub_variant", "hd0")),
            registered_at=str(data.get("registered_at", "")),
            spot_interruption=data.get("spot_interruption"),
            scheduled_events=tuple(data.get("scheduled_events") or ()),
            imported_meta_data=data.get("imported_meta_data"),
        )
        _check_guest_options(
            guest.instance_type,
            guest.http_tokens,
            guest.hop_limit,
            guest.pvgrub_variant,
            f"guest {guest.name}",
        )
        return guest


# Modification times come from a coarse clock: a change within this long of our
# last scan may not have moved the directory's mtime, so rescan until it settles.
_RACY_NS = 1_000_000_000


class GuestRegistry:
    """The guests/ directory: cached lookups by address for the server, atomic
    locked writes for the CLI."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.guests_dir = state_dir / "guests"
        self._lock = threading.Lock()
        self._by_ip: dict[str, Guest] = {}
        self._files: dict[str, tuple[int, int, Guest | None]] = {}
        self._dir_mtime: int | None = None
        self._scanned_at = 0
        self._complained: set[str] = set()

    # -- server side

    def by_ip(self, ip: str) -> Guest | None:
        self._refresh()
        return self._by_ip.get(ip)

    def _refresh(self) -> None:
        try:
            mtime = self.guests_dir.stat().st_mtime_ns
        except OSError:
            mtime = -1
        if mtime == self._dir_mtime and self._scanned_at - mtime >= _RACY_NS:
            return
        with self._lock:
            self._rescan()

    def _rescan(self) -> None:
        scanned_at = time.time_ns()
        try:
            mtime = self.guests_dir.stat().st_mtime_ns
            names = [n for n in os.listdir(self.guests_dir) if _is_guest_file(n)]
        except OSError:
            mtime, names = -1, []
        files: dict[str, tuple[int, int, Guest | None]] = {}
        for filename in names:
            path = self.guests_dir / filename
            try:
                st = path.stat()
            except OSError:
                continue  # removed while we looked
            cached = self._files.get(filename)
            if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
                files[filename] = cached
                continue
            files[filename] = (st.st_mtime_ns, st.st_size, self._parse(path))
        by_ip: dict[str, Guest] = {}
        guests = sorted((g for _, _, g in files.values() if g), key=lambda g: g.name)
        for guest in guests:
            if guest.ip in by_ip:
                self._complain(
                    f"dup:{guest.name}",
                    f"guests {by_ip[guest.ip].name} and {guest.name} share {guest.ip}; "
                    f"serving {by_ip[guest.ip].name}",
                )
                continue
            by_ip[guest.ip] = guest
        self._files, self._by_ip = files, by_ip
        self._dir_mtime, self._scanned_at = mtime, scanned_at

    def _parse(self, path: Path) -> Guest | None:
        try:
            guest = Guest.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError, ImdsError) as exc:
            self._complain(str(path), f"ignoring malformed registration {path}: {exc}")
            return None
        if f"{guest.name}.json" != path.name:
            self._complain(str(path), f"ignoring {path}: it registers {guest.name}")
            return None
        return guest

    def _complain(self, key: str, message: str) -> None:
        if key not in self._complained:
            self._complained.add(key)
            log.warning(message)

    # -- CLI side

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.guests_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def all(self) -> list[Guest]:
        guests = []
        try:
            names = sorted(os.listdir(self.guests_dir))
        except FileNotFoundError:
            return []
        for filename in names:
            if _is_guest_file(filename):
                guest = self._parse(self.guests_dir / filename)
                if guest is not None:
                    guests.append(guest)
        return guests

    def get(self, name: str) -> Guest:
        _check_name(name)
        path = self.guests_dir / f"{name}.json"
        if not path.exists():
            raise ImdsError(f"guest {name} is not registered; run `register` first")
        guest = self._parse(path)
        if guest is None:
            raise ImdsError(f"registration {path} is malformed; register {name} again")
        return guest

    def save(self, guest: Guest) -> None:
        path = self.guests_dir / f"{guest.name}.json"
        tmp = self.guests_dir / f".{guest.name}.json.{os.getpid()}.tmp"
        data = json.dumps(guest.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> bool:
        try:
            (self.guests_dir / f"{name}.json").unlink()
        except FileNotFoundError:
            return False
        return True


def _is_guest_file(filename: str) -> bool:
    return filename.endswith(".json") and not filename.startswith(".")


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ImdsError(
            f"guest name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


# ----------------------------------------------------------------------------- tokens


class TokenStore:
    """IMDSv2 session tokens: random, bound to one guest, expiring, bounded."""

    def __init__(
        self, capacity: int = 20000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[tuple[str, str], float]] = {}

    def issue(self, owner: tuple[str, str], ttl: int) -> str:
        token = base64.urlsafe_b64encode(secrets.token_bytes(42)).decode("ascii")
        now = self.clock()
        with self._lock:
            if len(self._tokens) >= self.capacity:
                self._tokens = {
                    t: entry for t, entry in self._tokens.items() if entry[1] > now
                }
            while len(self._tokens) >= self.capacity:
                # A guest that floods PUTs loses its oldest tokens, nothing else.
                del self._tokens[next(iter(self._tokens))]
            self._tokens[token] = (owner, now + ttl)
        return token

    def remaining(self, token: str, owner: tuple[str, str]) -> int | None:
        """Seconds left on a token valid for this owner, else None."""
        entry = self._tokens.get(token)
        if entry is None or entry[0] != owner:
            return None  # unknown, or another guest's token
        left = entry[1] - self.clock()
        if left <= 0:
            self._tokens.pop(token, None)
            return None
        return max(1, int(left))


# ------------------------------------------------------------------------------- tree


Leaf: TypeAlias = "str | bytes | Callable[[], str]"  # bytes: user-data, as is
Node: TypeAlias = "Leaf | dict[str, Any]"


def _ec2_json(data: Any) -> str:
    """JSON laid out the way the IMDS prints its documents."""
    return json.dumps(data, indent=2, separators=(",", " : "))


class MetadataTree:
    """Builds each guest's /latest tree and resolves request paths in it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Guest, dict[str, Any]]] = {}

    def version_tree(self, guest: Guest) -> dict[str, Any]:
        cached = self._cache.get(guest.name)
        if cached is not None and cached[0] is guest:
            return cached[1]
        tree = self.build(guest)
        with self._lock:
            if len(self._cache) > 1024:  # names of long-gone guests
                self._cache.clear()
            self._cache[guest.name] = (guest, tree)
        return tree

    def build(self, guest: Guest) -> dict[str, Any]:
        meta_data = self.meta_data(guest)
        if guest.imported_meta_data:
            overlay_import(meta_data, guest.imported_meta_data, guest.mac)
        tree: dict[str, Any] = {
            "meta-data": meta_data,
            "dynamic": {
                "instance-identity": {
                    "document": _ec2_json(self.identity_document(guest, meta_data))
                }
            },
        }
        if guest.user_data is not None:
            tree["user-data"] = guest.user_data
        return tree

    def meta_data(self, guest: Guest) -> dict[str, Any]:
        s = self.settings
        hostname = self.hostname(guest.ip)
        root_device = ROOT_DEVICES[guest.pvgrub_variant]
        sg_ids = "\n".join(
            f"sg-{_hex_id('sg', s.account_id, group)}" for group in s.security_groups
        )
        vpc_id = f"vpc-{_hex_id('vpc', s.account_id, s.region, s.vpc_cidr)}"
        interface = {
            "device-number": "0",
            "interface-id": f"eni-{_hex_id('eni', guest.instance_id, guest.mac)}",
            "local-hostname": hostname,
            "local-ipv4s": guest.ip,
            "mac": guest.mac,
            "owner-id": s.account_id,
            "security-group-ids": sg_ids,
            "security-groups": "\n".join(s.security_groups),
            "subnet-id": f"subnet-{_hex_id('subnet', vpc_id, s.zone, s.subnet_cidr)}",
            "subnet-ipv4-cidr-block": s.subnet_cidr,
            "vpc-id": vpc_id,
            "vpc-ipv4-cidr-block": s.vpc_cidr,
            "vpc-ipv4-cidr-blocks": s.vpc_cidr,
        }
        domain, partition = _services(s.region)
        tree: dict[str, Any] = {
            "ami-id": s.ami_id,
            "ami-launch-index": "0",
            "ami-manifest-path": "(unknown)",
            "block-device-mapping": {"ami": root_device, "root": root_device},
            "events": {
                "maintenance": {
                    "history": "[]",
                    "scheduled": _ec2_json(list(guest.scheduled_events))
                    if guest.scheduled_events
                    else "[]",
                }
            },
            "hostname": hostname,
            "instance-action": "none",
            "instance-id": guest.instance_id,
            "instance-life-cycle": "spot" if guest.spot_interruption else "on-demand",
            "instance-type": guest.instance_type,
            "local-hostname": hostname,
            "local-ipv4": guest.ip,
            "mac": guest.mac,
            "network": {"interfaces": {"macs": {guest.mac: interface}}},
            "placement": {"availability-zone": s.zone, "region": s.region},
            "profile": "default-paravirtual",
            "reservation-id": guest.reservation_id,
            "security-groups": "\n".join(s.security_groups),
            "services": {"domain": domain, "partition": partition},
        }
        kernel_id = PVGRUB_AKIS[guest.pvgrub_variant].get(s.region)
        if kernel_id:
            tree["kernel-id"] = kernel_id
        if s.iam_role:
            tree["iam"] = self._iam(guest, s.iam_role)
        if s.ssh_public_key:
            tree["public-keys"] = {
                f"0={s.ssh_key_name}": {"openssh-key": s.ssh_public_key}
            }
        if guest.spot_interruption:
            spot = {"instance-action": _ec2_json(guest.spot_interruption)}
            if guest.spot_interruption.get("action") == "terminate":
                spot["termination-time"] = guest.spot_interruption["time"]
            tree["spot"] = spot
        return tree

    def hostname(self, ip: str) -> str:
        dashed = ip.replace(".", "-")
        if self.settings.region == "us-east-1":
            return f"ip-{dashed}.ec2.internal"
        return f"ip-{dashed}.{self.settings.region}.compute.internal"

    def _iam(self, guest: Guest, role: str) -> dict[str, Any]:
        account = self.settings.account_id
        profile_id = "AIPA" + _hex_id("profile", account, role).upper()
        profile_arn = f"arn:aws:iam::{account}:instance-profile/{role}"

        def info() -> str:
            return _ec2_json(
                {
                    "Code": "Success",
                    "LastUpdated": _iso(_credentials_period()[0]),
                    "InstanceProfileArn": profile_arn,
                    "InstanceProfileId": profile_id,
                }
            )

        def credentials() -> str:
            # Rotated hourly and valid six hours, like EC2's role credentials, and
            # unmistakably fake so nobody mistakes them for working keys.
            updated, expires = _credentials_period()
            period = _iso(updated)
            return _ec2_json(
                {
                    "Code": "Success",
                    "LastUpdated": period,
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "ASIA"
                    + _hex_id("akid", guest.instance_id, period, length=16).upper(),
                    "SecretAccessKey": "pvlabFAKEsecret/"
                    + _hex_id("secret", guest.instance_id, period, length=24),
                    "Token": "pvlab-FAKE-session-token/"
                    + _hex_id("token", guest.instance_id, period, length=40),
                    "Expiration": _iso(expires),
                }
            )

        return {"info": info, "security-credentials": {role: credentials}}

    def identity_document(
        self, guest: Guest, meta_data: dict[str, Any]
    ) -> dict[str, Any]:
        def leaf(*path: str) -> str | None:
            node: Any = meta_data
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            return node if isinstance(node, str) else None

        return {
            "accountId": self.settings.account_id,
            "architecture": "x86_64",
            "availabilityZone": leaf("placement", "availability-zone"),
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": leaf("ami-id"),
            "instanceId": leaf("instance-id"),
            "instanceType": leaf("instance-type"),
            "kernelId": leaf("kernel-id"),
            "pendingTime": guest.registered_at,
            "privateIp": guest.ip,
            "ramdiskId": None,
            "region": leaf("placement", "region"),
            "version": "2017-09-30",
        }

    def resolve(self, guest: Guest, segments: list[str]) -> Node | None:
        """The node at a request path (split on "/", empty parts dropped)."""
        if not segments:
            return {version: "" for version in API_VERSIONS}
        if segments[0] not in API_VERSIONS:
            return None
        node: Node = self.version_tree(guest)
        for segment in segments[1:]:
            if not isinstance(node, dict):
                return None
            child = _child(node, segment)
            if child is None:
                return None
            node = child
        return node


def _credentials_period() -> tuple[datetime, datetime]:
    updated = _utc_now().replace(minute=0, second=0)
    return updated, updated + timedelta(hours=6)


def _services(region: str) -> tuple[str, str]:
    if region.startswith("cn-"):
        return "amazonaws.com.cn", "aws-cn"
    if region.startswith("us-gov-"):
        return "amazonaws.com", "aws-us-gov"
    return "amazonaws.com", "aws"


def _child(directory: dict[str, Any], segment: str) -> Node | None:
    if segment in directory:
        return directory[segment]
    for key, value in directory.items():
        if "=" in key and key.split("=", 1)[0] == segment:
            return value
    return None


def listing(directory: dict[str, Any], slashes: bool = True) -> str:
    """A directory as EC2 lists it: sorted, sub-directories end in "/"."""
    names = []
    for key in sorted(directory):
        is_dir = isinstance(directory[key], dict) and "=" not in key
        names.append(f"{key}/" if is_dir and slashes else key)
    return "\n".join(names)


# ----------------------------------------------------------------------------- import

OWNED_TOP_LEVEL = (
    "mac",
    "local-ipv4",
    "local-hostname",
    "hostname",
    "iam",
    "events",
    "spot",
)
OWNED_INTERFACE_KEYS = ("mac", "local-ipv4s", "local-hostname", "device-number")
IMPORT_MAX_LEAVES = 5000
IMPORT_MAX_DEPTH = 16


def validate_import(tree: Any, origin: str) -> dict[str, Any]:
    """Check an import tree's shape; returns it or raises ImdsError naming the path."""
    if not isinstance(tree, dict):
        raise ImdsError(
            f"{origin} must hold one JSON object mirroring /latest/meta-data"
        )
    leaves = 0

    def walk(node: dict[str, Any], path: str, depth: int) -> None:
        nonlocal leaves
        if depth > IMPORT_MAX_DEPTH:
            raise ImdsError(f"{origin}: {path} is nested deeper than EC2 ever goes")
        for key, value in node.items():
            where = f"{path}{key}"
            if not key or "/" in key or key in (".", ".."):
                raise ImdsError(f"{origin}: {where!r} is not a metadata name")
            if isinstance(value, dict):
                walk(value, f"{where}/", depth + 1)
            elif isinstance(value, str):
                leaves += 1
                if leaves > IMPORT_MAX_LEAVES:
                    raise ImdsError(
                        f"{origin} has more than {IMPORT_MAX_LEAVES} leaves"
                    )
            else:
                raise ImdsError(
                    f"{origin}: {where} must be a string (leaf) or an object "
                    "(directory)"
                )

    walk(tree, "", 0)
    return tree


def overlay_import(
    base: dict[str, Any], imported: dict[str, Any], mac: str
) -> list[str]:
    """Merge an imported tree into the emulator's; returns the paths the emulator
    kept because it owns them."""
    kept: list[str] = []
    for key, value in imported.items():
        if key in OWNED_TOP_LEVEL:
            kept.append(key)
        elif key == "network":
            _overlay_network(base, value, mac, imported.get("mac"), kept)
        elif key == "public-keys" or not isinstance(value, dict):
            base[key] = value
        else:
            if not isinstance(base.get(key), dict):
                base[key] = {}
            _merge(base[key], value)
    return kept


def _merge(base: dict[str, Any], imported: dict[str, Any]) -> None:
    for key, value in imported.items():
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}
            _merge(base[key], value)
        else:
            base[key] = value


def _overlay_network(
    base: dict[str, Any], imported: Any, mac: str, imported_mac: Any, kept: list[str]
) -> None:
    macs = (
        imported.get("interfaces", {}).get("macs", {})
        if isinstance(imported, dict)
        else {}
    )
    if not isinstance(macs, dict) or not macs:
        kept.append("network")
        return
    primary = imported_mac if imported_mac in macs else None
    if primary is None:
        primary = next(
            (
                m
                for m, d in macs.items()
                if isinstance(d, dict) and d.get("device-number") == "0"
            ),
            next(iter(macs)),
        )
    ours = base["network"]["interfaces"]["macs"][mac]
    for other, node in macs.items():
        if other != primary or not isinstance(node, dict):
            kept.append(f"network/interfaces/macs/{other}")
            continue
        for key, value in node.items():
            if key in OWNED_INTERFACE_KEYS:
                kept.append(f"network/interfaces/macs/{other}/{key}")
            elif isinstance(value, dict):
                ours.setdefault(key, {})
                if isinstance(ours[key], dict):
                    _merge(ours[key], value)
            else:
                ours[key] = value


# -------------------------------------------------------------------------------- log


def _still_at(fh: io.TextIOWrapper, path: Path) -> bool:
    """Whether the open file is still the one at path."""
    try:
        here, there = os.fstat(fh.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class RequestLog:
    """Per-guest JSON-lines request logs, rotated at a size limit."""

    def __init__(self, logs_dir: Path, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.logs_dir = logs_dir
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[str, io.TextIOWrapper] = {}

    def path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.jsonl"

    def append(self, name: str, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            with self._lock:
                fh = self._files.get(name)
                if fh is not None and not _still_at(fh, self.path(name)):
                    # Removed or replaced since it was opened (a new guest of an
                    # old name starts a new log): write where readers look.
                    fh.close()
                    del self._files[name]
                    fh = None
                if fh is None:
                    if len(self._files) >= 64:
                        self._close_all()
                    self.logs_dir.mkdir(parents=True, exist_ok=True)
                    # Kept open across requests; closed by close() or rotation.
                    fh = self._files[name] = open(  # noqa: SIM115
                        self.path(name), "a", encoding="utf-8"
                    )
                fh.write(line)
                fh.flush()
                if fh.tell() > self.max_bytes:
                    fh.close()
                    del self._files[name]
                    os.replace(self.path(name), f"{self.path(name)}.1")
        except OSError as exc:
            # A full disk must not take the metadata service down with it.
            log.warning("cannot write the request log of %s: %s", name, exc)

    def _close_all(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def close(self) -> None:
        with self._lock:
            self._close_all()


# ---------------------------------------------------------------------------- service


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    started: float
    keep_alive: bool = True
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: list[tuple[str, str]] = field(default_factory=list)
    ip_ttl: int | None = None  # IP TTL for the packets of this response
    close: bool = False


def error_response(status: int, *headers: tuple[str, str]) -> Response:
    """EC2's error page: a small XHTML document naming the status."""
    title = f"{status} - {http.HTTPStatus(status).phrase}"
    page = (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )
    return Response(status, page.encode("latin-1"), "text/html", list(headers))


class MetadataService:
    """Answers one parsed request for the guest at a source address."""

    def __init__(
        self,
        registry: GuestRegistry,
        settings: Settings,
        request_log: RequestLog,
        tokens: TokenStore | None = None,
    ) -> None:
        self.registry = registry
        self.tree = MetadataTree(settings)
        self.request_log = request_log
        self.tokens = tokens or TokenStore()
        self._warned: dict[str, float] = {}

    def respond(self, request: Request, source_ip: str) -> tuple[Response, str]:
        """The response and the IMDS version the request used ("v1"/"v2"/"-")."""
        guest = self.registry.by_ip(source_ip)
        if guest is None:
            self._warn_unregistered(source_ip, request)
            return error_response(404), "-"
        segments = [part for part in request.path.split("/") if part]
        if segments == ["latest", "api", "token"]:
            if request.method != "PUT":
                return error_response(405, ("Allow", "PUT")), "-"
            return self._issue_token(request, guest), "v2"
        if request.method not in ("GET", "HEAD"):
            return error_response(405, ("Allow", "GET, HEAD")), "-"

        token = request.headers.get(TOKEN_HEADER)
        remaining = None
        if token is not None:
            remaining = self.tokens.remaining(token, (guest.name, guest.instance_id))
            if remaining is None:
                return error_response(401), "v2"
        elif guest.http_tokens == "required":
            return error_response(401), "v1"
        version = "v1" if token is None else "v2"

        node = self.tree.resolve(guest, segments)
        if node is None:
            return error_response(404), version
        # EC2 lists the categories of a version (/latest/) without slashes.
        response = _node_response(node, slashes=len(segments) != 1)
        if remaining is not None:
            response.headers.append(
                ("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", str(remaining))
            )
        return response, version

    def _issue_token(self, request: Request, guest: Guest) -> Response:
        # A proxy adds X-Forwarded-For; refusing it keeps tokens off proxied paths.
        if "x-forwarded-for" in request.headers:
            return error_response(403)
        raw = request.headers.get(TOKEN_TTL_HEADER, "").strip()
        low, high = TOKEN_TTL_RANGE
        if not _DIGITS_RE.fullmatch(raw) or not low <= int(raw) <= high:
            return error_response(400)
        ttl = int(raw)
        token = self.tokens.issue((guest.name, guest.instance_id), ttl)
        return Response(
            200,
            token.encode("ascii"),
            "text/plain",
            [("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", str(ttl))],
            ip_ttl=guest.hop_limit,
        )

    def record(
        self,
        source_ip: str,
        method: str,
        path: str,
        status: int,
        started: float,
        version: str,
    ) -> None:
        guest = self.registry.by_ip(source_ip)
        entry = {
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "method": method[:16],
            "path": path.split("?", 1)[0][:512],
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "source": source_ip,
            "imds": version,
        }
        self.request_log.append(guest.name if guest else UNREGISTERED_LOG, entry)

    def _warn_unregistered(self, source_ip: str, request: Request) -> None:
        now = time.monotonic()
        if now - self._warned.get(source_ip, -3600.0) >= 60:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned[source_ip] = now
            log.warning(
                "404 for %s %s from %s: no guest is registered with that address",
                request.method,
                request.path[:128],
                source_ip,
            )


def _node_response(node: Node, slashes: bool) -> Response:
    if isinstance(node, dict):
        return Response(200, listing(node, slashes).encode())
    if isinstance(node, bytes):
        return Response(200, node, "application/octet-stream")
    text = node() if callable(node) else node
    return Response(200, text.encode())


# ------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a flood of slow or hostile clients from exhausting dom0."""

    workers: int = 16
    queue_size: int = 64
    request_timeout: float = 5.0  # whole request, from its first byte or idle wait
    write_timeout: float = 5.0
    max_request_line: int = 8192
    max_header_line: int = 8192
    max_headers: int = 64
    max_header_bytes: int = 16384
    max_body: int = 65536
    max_requests_per_connection: int = 1000


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _ConnectionDone(Exception):
    """The client closed the connection or went quiet between requests."""


class _DeadlineReader(io.RawIOBase):
    """Socket reads that all share one deadline, so a client trickling bytes cannot
    hold a worker longer than the request timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


def read_request(reader: io.BufferedReader, limits: Limits) -> Request:
    line = b""
    for _ in range(3):  # RFC 9112: ignore empty lines before a request line
        line = reader.readline(limits.max_request_line + 1)
        if line not in (b"\r\n", b"\n"):
            break
    started = time.perf_counter()
    if not line:
        raise _ConnectionDone
    if len(line) > limits.max_request_line:
        raise HttpError(414)
    if not line.endswith(b"\n"):
        raise _ConnectionDone
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise HttpError(400)
    method, target, version = parts
    if not _HTTP_TOKEN_RE.fullmatch(method) or not target.startswith("/"):
        raise HttpError(400)
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505 if re.fullmatch(r"HTTP/\d\.\d", version) else 400)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        raise HttpError(400)

    headers: dict[str, str] = {}
    total = count = 0
    while True:
        raw = reader.readline(limits.max_header_line + 1)
        if not raw.endswith(b"\n"):
            if len(raw) > limits.max_header_line:
                raise HttpError(431)
            raise _ConnectionDone
        total += len(raw)
        count += 1
        if total > limits.max_header_bytes or count > limits.max_headers:
            raise HttpError(431)
        if raw in (b"\r\n", b"\n"):
            break
        if raw[:1] in (b" ", b"\t"):
            raise HttpError(400)  # obsolete line folding
        name, colon, value = raw.decode("latin-1").partition(":")
        if not colon or not _HTTP_TOKEN_RE.fullmatch(name):
            raise HttpError(400)
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value

    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    request = Request(method, target, version, headers, started, keep_alive)

    if "transfer-encoding" in headers:
        request.keep_alive = False  # answer, then close instead of parsing chunks
    elif "content-length" in headers:
        length = headers["content-length"]
        if not _DIGITS_RE.fullmatch(length):
            raise HttpError(400)
        if int(length) > limits.max_body:
            request.keep_alive = False
        else:
            request.body = reader.read(int(length))
            if len(request.body) < int(length):
                raise _ConnectionDone
    return request


def render(response: Response, request_method: str, keep_alive: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {http.HTTPStatus(response.status).phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        "Server: EC2ws",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in response.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if request_method == "HEAD" else head + response.body


class ImdsRequestHandler(socketserver.BaseRequestHandler):
    """HTTP/1.1 with keep-alive, strict limits and EC2's status codes."""

    server: ImdsServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        source_ip = self.client_address[0]
        limits = self.server.limits
        service = self.server.service
        raw = _DeadlineReader(sock)
        reader = io.BufferedReader(raw, limits.max_header_bytes)
        for served in range(1, limits.max_requests_per_connection + 1):
            raw.deadline = time.monotonic() + limits.request_timeout
            started = time.perf_counter()
            try:
                request = read_request(reader, limits)
            except _ConnectionDone:
                return
            except HttpError as exc:
                service.record(source_ip, "-", "-", exc.status, started, "-")
                self._send(sock, error_response(exc.status), "GET", False)
                return
            except (TimeoutError, OSError, ValueError):
                return
            try:
                response, version = service.respond(request, source_ip)
            except Exception:
                log.exception("failed to answer %s %s", request.method, request.path)
                response, version = error_response(500), "-"
            # Hand the worker to a waiting connection rather than keep this one.
            keep_alive = (
                request.keep_alive
                and not response.close
                and served < limits.max_requests_per_connection
                and not self.server.has_waiting()
            )
            # Logged before sending, so a guest that has its answer is in the log.
            service.record(
                source_ip,
                request.method,
                request.path,
                response.status,
                request.started,
                version,
            )
            sent = self._send(sock, response, request.method, keep_alive)
            if not (sent and keep_alive):
                return

    def _send(
        self, sock: socket.socket, response: Response, method: str, keep_alive: bool
    ) -> bool:
        data = render(response, method, keep_alive)
        try:
            sock.settimeout(self.server.limits.write_timeout)
            if response.ip_ttl is None:
                sock.sendall(data)
                return True
            # The hop limit: like EC2, send the token with a TTL that stops it a
            # given number of routers away (containers, forwarding guests).
            default_ttl = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, response.ip_ttl)
            try:
                sock.sendall(data)
            finally:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, default_ttl)
            return True
        except OSError:
            return False


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: EC2ws\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


class ImdsServer(socketserver.TCPServer):
    """TCP server with a fixed pool of worker threads and a bounded queue of
    accepted connections; when both are full, new connections get 503 at once."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], service: MetadataService, limits: Limits
    ) -> None:
        self.service = service
        self.limits = limits
        # One slot per connection a worker serves or that waits for one.
        self._slots = threading.BoundedSemaphore(limits.workers + limits.queue_size)
        self._pending: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue()
        super().__init__(address, ImdsRequestHandler)
        self._workers = [
            threading.Thread(target=self._work, name=f"imds-worker-{n}", daemon=True)
            for n in range(limits.workers)
        ]
        for worker in self._workers:
            worker.start()

    def has_waiting(self) -> bool:
        return not self._pending.empty()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            self._pending.put((request, client_address))
            return
        try:
            request.setblocking(False)
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                log.exception("connection from %s failed", client_address[0])
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        while True:  # close connections still waiting for a worker
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
                self._slots.release()
        for _ in self._workers:
            self._pending.put(None)
        for worker in self._workers:
            worker.join(timeout=self.limits.request_timeout + 1)
        self.service.request_log.close()


def make_server(
    address: str,
    port: int,
    state_dir: Path,
    settings: Settings,
    limits: Limits | None = None,
) -> ImdsServer:
    """Bind the service; call serve_forever() on the result, then server_close()."""
    (state_dir / "guests").mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    service = MetadataService(
        GuestRegistry(state_dir), settings, RequestLog(state_dir / "logs")
    )
    return ImdsServer((address, port), service, limits or Limits())


# ------------------------------------------------------------------- control socket
#
# dom0's own way to register and forget guests without starting a Python process
# per boot (seconds in an emulated dom0): HTTP over a Unix socket that only root can
# open, spoken by curl.
#
#   PUT /guests/NAME?mac=M&ip=A[&instance-type=T][&instance-id=I][&http-tokens=H]
#       [&hop-limit=N][&pvgrub-variant=V][&no-user-data=1]   body: the user-data
#   DELETE /guests/NAME
#
# 200 with the messages `register`/`unregister` would print, or 400 with the one
# sentence they would refuse with.

_CONTROL_OPTIONS = {
    "mac", "ip", "instance-type", "instance-id", "http-tokens", "hop-limit",
    "pvgrub-variant", "no-user-data",
}


def control(state_dir: Path, settings: Settings, request: Request) -> Response:
    """Answer one control request."""
    match = re.fullmatch(r"/guests/([^/]+)", request.path)
    if not match:
        return Response(404, b"no such control path; use /guests/NAME\n")
    name = match.group(1)
    try:
        query = _control_query(request.target.partition("?")[2])
        if request.method == "PUT":
            hop_limit = query.get("hop-limit")
            if hop_limit is not None and not _DIGITS_RE.fullmatch(hop_limit):
                raise ImdsError(f"hop limit {hop_limit!r} is not a number")
            if int(request.headers.get("content-length") or 0) > USER_DATA_LIMIT:
                raise ImdsError(_too_large("the request"))
            messages = register(
                state_dir,
                settings,
                name=name,
                mac=_required(query, "mac"),
                ip=_required(query, "ip"),
                user_data=None if "no-user-data" in query else request.body,
                instance_type=query.get("instance-type"),
                instance_id=query.get("instance-id"),
                http_tokens=query.get("http-tokens"),
                hop_limit=None if hop_limit is None else int(hop_limit),
                pvgrub_variant=query.get("pvgrub-variant"),
            )
        elif request.method == "DELETE":
            messages = [unregister(state_dir, name)]
        else:
            return Response(405, b"use PUT to register and DELETE to forget\n")
    except ImdsError as exc:
        return Response(400, f"{exc}\n".encode())
    for message in messages:
        log.info("control: %s", message)
    return Response(200, "".join(f"{m}\n" for m in messages).encode())


def _control_query(query: str) -> dict[str, str]:
    from urllib.parse import parse_qsl  # the server alone needs it

    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ImdsError("the request's query string is malformed") from None
    unknown = sorted({key for key, _ in pairs} - _CONTROL_OPTIONS)
    if unknown:
        raise ImdsError(f"unknown option {unknown[0]!r} in the request")
    return dict(pairs)


def _required(query: dict[str, str], key: str) -> str:
    if not query.get(key):
        raise ImdsError(f"the request gives no {key}")
    return query[key]


class ControlHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        self.request.settimeout(self.server.limits.request_timeout)
        try:
            request = read_request(self.rfile, self.server.limits)
        except HttpError as exc:
            self.wfile.write(render(Response(exc.status), "GET", keep_alive=False))
            return
        except (_ConnectionDone, OSError):
            return
        response = control(self.server.state_dir, self.server.settings, request)
        self.wfile.write(render(response, request.method, keep_alive=False))


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The control socket: a thread per connection (they are few and short)."""

    daemon_threads = True

    def __init__(self, path: Path, state_dir: Path, settings: Settings) -> None:
        self.path = path
        self.state_dir = state_dir
        self.settings = settings
        self.limits = Limits()
        path.unlink(missing_ok=True)  # left by a service that was killed
        super().__init__(str(path), ControlHandler)
        os.chmod(path, 0o600)

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- CLI


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    limits = Limits(
        workers=args.workers,
        queue_size=args.queue,
        request_timeout=args.request_timeout,
    )
    try:
        server = make_server(args.address, args.port, args.state_dir, settings, limits)
    except OSError as exc:
        raise ImdsError(
            f"cannot listen on {args.address}:{args.port} ({exc.strerror}); "
            "check that the address is on this host and the port is free"
        ) from None

    control_path = args.control_socket or args.state_dir / "control.sock"
    try:
        control_server = ControlServer(control_path, args.state_dir, settings)
    except OSError as exc:
        server.server_close()
        raise ImdsError(
            f"cannot listen on {control_path} ({exc.strerror}); check that its "
            "directory exists and is writable"
        ) from None
    threading.Thread(
        target=control_server.serve_forever, name="imds-control", daemon=True
    ).start()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    log.info(
        "serving EC2 instance metadata on %s:%s for the guests in %s (region %s)",
        host,
        port,
        args.state_dir,
        settings.region,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        log.info("stopping the metadata service")
    finally:
        control_server.shutdown()
        control_server.server_close()
        server.server_close()
    return 0


def read_user_data(args: argparse.Namespace) -> bytes | None:
    if args.no_user_data:
        return None
    if args.user_data_file is None:
        return b"{}"  # UniK images wait forever for user-data; {} lets them boot
    source = args.user_data_file
    try:
        if source == "-":
            data = sys.stdin.buffer.read(USER_DATA_LIMIT + 1)
        else:
            with open(source, "rb") as fh:
                data = fh.read(USER_DATA_LIMIT + 1)
    except OSError as exc:
        raise ImdsError(
            f"cannot read user-data file {source} ({exc.strerror}); check the path"
        ) from None
    if len(data) > USER_DATA_LIMIT:
        raise ImdsError(_too_large("standard input" if source == "-" else source))
    return data


def _too_large(where: str) -> str:
    return (
        f"user-data from {where} is larger than EC2's limit of {USER_DATA_LIMIT} "
        "bytes (16 KiB); shrink it or fetch the bulk from elsewhere at boot"
    )


def user_data_warning(data: bytes | None) -> str | None:
    """Why UniK images would not parse this user-data, or None if they would."""
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return "is not JSON"
    if not isinstance(value, dict):
        return "is JSON but not an object"
    if not all(isinstance(v, str) for v in value.values()):
        return "is a JSON object whose values are not all strings"
    return None


def register(
    state_dir: Path,
    settings: Settings,
    *,
    name: str,
    mac: str,
    ip: str,
    user_data: bytes | None,
    instance_type: str | None = None,
    instance_id: str | None = None,
    http_tokens: str | None = None,
    hop_limit: int | None = None,
    pvgrub_variant: str | None = None,
) -> list[str]:
    """Register a guest or replace its record; returns what to tell the user
    (warnings first, then the confirmation). Raises ImdsError on a refusal."""
    _check_name(name)
    defaults = settings.guest_defaults
    mac = normalise_mac(mac)
    ip = _check_ipv4(ip)
    instance_type = instance_type or defaults.instance_type
    http_tokens = http_tokens or defaults.http_tokens
    hop_limit = hop_limit if hop_limit is not None else defaults.hop_limit
    variant = pvgrub_variant or defaults.pvgrub_variant
    _check_guest_options(instance_type, http_tokens, hop_limit, variant, "register")
    instance_id = instance_id or Guest.default_instance_id(name, mac)
    if not _INSTANCE_ID_RE.fullmatch(instance_id):
        raise ImdsError(f"instance id {instance_id!r} is not like i-0123456789abcdef0")
    if user_data is not None and len(user_data) > USER_DATA_LIMIT:
        raise ImdsError(_too_large("the request"))

    registry = GuestRegistry(state_dir)
    with registry.locked():
        for other in registry.all():
            if other.name == name:
                if other.mac != mac:
                    raise ImdsError(
                        f"guest {name} is already registered with MAC "
                        f"{other.mac}; unregister it first"
                    )
                continue
            for what, mine, theirs in (
                ("IP address", ip, other.ip),
                ("MAC address", mac, other.mac),
                ("instance id", instance_id, other.instance_id),
            ):
                if mine == theirs:
                    raise ImdsError(
                        f"{what} {mine} already belongs to guest {other.name}; "
                        f"unregister {other.name} or choose another {what}"
                    )
        registry.save(
            Guest(
                name=name,
                mac=mac,
                ip=ip,
                instance_id=instance_id,
                reservation_id=f"r-{_hex_id('reservation', name, mac)}",
                instance_type=instance_type,
                user_data=user_data,
                http_tokens=http_tokens,
                hop_limit=hop_limit,
                pvgrub_variant=variant,
                registered_at=_iso(_utc_now()),
            )
        )
    messages = []
    problem = user_data_warning(user_data)
    if problem:
        messages.append(
            f"warning: the user-data of {name} {problem}; UniK images expect a JSON "
            "object of strings such as {} and may not boot with it"
        )
    if settings.region not in PVGRUB_AKIS[variant]:
        messages.append(
            f"warning: no PV-GRUB {variant} AKI is known for {settings.region}, "
            "so kernel-id is absent"
        )
    messages.append(
        f"registered guest {name} as {instance_id} ({ip}, {mac}, {instance_type})"
    )
    return messages


def unregister(state_dir: Path, name: str | None = None, mac: str | None = None) -> str:
    """Forget a guest by name or MAC; fine if it is already gone."""
    if not state_dir.exists():
        return f"no guest to unregister: {state_dir} does not exist"
    registry = GuestRegistry(state_dir)
    with registry.locked():
        if name is not None:
            _check_name(name)
            names = [name]
        else:
            mac = normalise_mac(str(mac))
            names = [g.name for g in registry.all() if g.mac == mac]
        removed = [n for n in names if registry.remove(n)]
    if removed:
        return f"unregistered guest {', '.join(removed)}"
    return f"guest {name or mac} was not registered"


def cmd_register(args: argparse.Namespace) -> int:
    messages = register(
        args.state_dir,
        Settings.load(args.config),
        name=args.name,
        mac=args.mac,
        ip=args.ip,
        user_data=read_user_data(args),
        instance_type=args.instance_type,
        instance_id=args.instance_id,
        http_tokens=args.http_tokens,
        hop_limit=args.hop_limit,
        pvgrub_variant=args.pvgrub_variant,
    )
    for message in messages:
        (log.warning if message.startswith("warning:") else log.info)("%s", message)
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    log.info("%s", unregister(args.state_dir, args.name, args.mac))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    _check_name(args.name)
    request_log = RequestLog(args.state_dir / "logs")
    path = request_log.path(args.name)
    rotated = Path(f"{path}.1")
    if not args.follow:
        if not path.exists() and not rotated.exists():
            raise ImdsError(
                f"no request from guest {args.name} is logged in {args.state_dir}; "
                "check the name and that the guest has asked for metadata"
            )
        for source in (rotated, path):
            if source.exists():
                sys.stdout.write(source.read_text(encoding="utf-8"))
        return 0
    with suppress(KeyboardInterrupt):
        follow(path)
    return 0


def follow(path: Path, poll: float = 0.25) -> None:
    """Print a log as it grows, across rotations, until interrupted."""
    fh = None
    inode = None
    while True:
        if fh is None:
            try:
                fh = open(path, encoding="utf-8")  # noqa: SIM115 - reopened on rotation
                inode = os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                time.sleep(poll)
                continue
        chunk = fh.read()
        if chunk:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            continue
        try:
            if os.stat(path).st_ino != inode:
                fh.close()
                fh = None
                continue
        except FileNotFoundError:
            pass
        time.sleep(poll)


def cmd_event(args: argparse.Namespace) -> int:
    registry = GuestRegistry(args.state_dir)
    now = _utc_now()
    with registry.locked():
        guest = registry.get(args.name)
        if args.clear:
            guest = dataclasses.replace(
                guest, spot_interruption=None, scheduled_events=()
            )
            what = "cleared the events of"
        elif args.spot_interruption:
            # EC2 gives a spot instance two minutes' notice.
            notice = {
                "action": args.spot_interruption,
                "time": _iso(now + timedelta(minutes=2)),
            }
            guest = dataclasses.replace(guest, spot_interruption=notice)
            what = f"scheduled a spot {args.spot_interruption} for"
        else:
            code = args.scheduled_event
            if code not in SCHEDULED_EVENT_CODES:
                raise ImdsError(
                    f"scheduled event code {code!r} is not one EC2 uses; choose one "
                    f"of {', '.join(SCHEDULED_EVENT_CODES)}"
                )
            start = now + timedelta(days=7)
            stamp = "%d %b %Y %H:%M:%S GMT"
            event = {
                "Code": code,
                "Description": SCHEDULED_EVENT_CODES[code],
                "EventId": f"instance-event-{secrets.token_hex(9)[:17]}",
                "NotAfter": (start + timedelta(hours=2)).strftime(stamp),
                "NotBefore": start.strftime(stamp),
                "State": "active",
            }
            guest = dataclasses.replace(
                guest, scheduled_events=(*guest.scheduled_events, event)
            )
            what = f"scheduled {code} for"
        registry.save(guest)
    log.info("%s guest %s", what, args.name)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        if str(args.file) == "-":
            raw = sys.stdin.buffer.read(1024 * 1024 + 1)
        else:
            raw = args.file.read_bytes()
    except OSError as exc:
        raise ImdsError(f"cannot read {args.file} ({exc.strerror})") from None
    if len(raw) > 1024 * 1024:
        raise ImdsError(f"{args.file} is over 1 MiB; a metadata tree is a few KiB")
    try:
        imported = json.loads(raw)
    except ValueError as exc:
        raise ImdsError(f"{args.file} is not JSON ({exc})") from None
    validate_import(imported, str(args.file))
    settings = Settings.load(args.config)
    registry = GuestRegistry(args.state_dir)
    with registry.locked():
        guest = registry.get(args.name)
        base = MetadataTree(settings).meta_data(guest)
        kept = overlay_import(base, imported, guest.mac)
        registry.save(dataclasses.replace(guest, imported_meta_data=imported))
    for path in kept:
        print(f"kept {path}: the emulator owns it for guest {args.name}")
    log.info("imported %s into guest %s (%d kept)", args.file, args.name, len(kept))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imds.py", description="EC2 instance metadata service for pvlab guests."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def state_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"registrations and logs (default {DEFAULT_STATE_DIR})",
        )

    def config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"service settings (default {DEFAULT_CONFIG}, if present)",
        )

    p = commands.add_parser("serve", help="answer the guests' metadata requests")
    p.add_argument("--address", default="198.19.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=80)
    state_dir(p)
    config(p)
    p.add_argument("--workers", type=int, default=16, help="worker threads")
    p.add_argument(
        "--queue",
        type=int,
        default=64,
        help="connections that may wait for a worker before 503",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=5.0,
        help="seconds a client has to send a whole request",
    )
    p.add_argument(
        "--control-socket",
        type=Path,
        default=None,
        help="Unix socket for register/forget requests from dom0 itself "
        "(default: control.sock in the state directory)",
    )
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("register", help="register a guest or replace its record")
    state_dir(p)
    config(p)
    p.add_argument("--name", required=True, help="the domain name of the guest")
    p.add_argument("--mac", required=True, help="MAC address of the guest's vif")
    p.add_argument("--ip", required=True, help="the guest's fixed DHCP address")
    p.add_argument("--instance-type", help="default m1.small")
    p.add_argument("--instance-id", help="default: derived from name and MAC")
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--user-data-file",
        metavar="PATH|-",
        help="user-data, served unchanged (default: {})",
    )
    data.add_argument(
        "--no-user-data",
        action="store_true",
        help="no user-data: /latest/user-data answers 404",
    )
    p.add_argument("--http-tokens", choices=HTTP_TOKENS, help="default optional")
    p.add_argument("--hop-limit", type=int, help="IP TTL of token responses (1)")
    p.add_argument("--pvgrub-variant", choices=PVGRUB_VARIANTS, help="default hd0")
    p.set_defaults(func=cmd_register)

    p = commands.add_parser("unregister", help="forget a guest; fine if already gone")
    state_dir(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name")
    which.add_argument("--mac")
    p.set_defaults(func=cmd_unregister)

    p = commands.add_parser("log", help="print a guest's request log")
    state_dir(p)
    p.add_argument("--name", required=True)
    p.add_argument("--follow", action="store_true", help="keep printing new requests")
    p.set_defaults(func=cmd_log)

    p = commands.add_parser("event", help="set or clear a guest's EC2 events")
    state_dir(p)
    p.add_argument("--name", required=True)
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--spot-interruption", choices=SPOT_ACTIONS)
    kind.add_argument(
        "--scheduled-event",
        metavar="CODE",
        help=f"one of {', '.join(SCHEDULED_EVENT_CODES)}",
    )
    kind.add_argument("--clear", action="store_true")
    p.set_defaults(func=cmd_event)

    p = commands.add_parser("import", help="replay metadata captured on EC2")
    state_dir(p)
    config(p)
    p.add_argument("--name", required=True)
    p.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="JSON from scripts/imds-capture.py, or - for stdin",
    )
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        fmt = "%(levelname)s %(message)s" if args.command == "serve" else "%(message)s"
        logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    try:
        return args.func(args)
    except ImdsError as exc:
        print(f"imds: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
