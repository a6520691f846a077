"""One typed settings object read from defaults, pvlab.yml, PVLAB_* variables and flags.

Each value remembers where it came from, so `invoke settings` can say why it is set.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pvlab.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILE = "pvlab.yml"
ENV_PREFIX = "PVLAB_"
NAME_PREFIX = "pvlab"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pvlab"


@dataclass
class Settings:
    # Every libvirt domain, network and volume pvlab creates starts with this.
    name_prefix: str = NAME_PREFIX
    # The dom0 VM.
    provider: str = "libvirt"
    accel: str = "auto"
    vm_memory: int = 2560
    vm_cpus: int = 2
    dom0_memory: int = 1024
    box_name: str = "pvlab/debian12"
    box_build: bool = True
    # Networks, all inside 198.18.0.0/15 and isolated from the host's own network.
    mgmt_network: str = "198.18.0.0/24"
    bridge_network: str = "198.19.0.0/16"
    public_network: bool = False
    public_network_interface: str = ""
    # Packages reach the VM through an apt cache on the host's side of the VM network.
    apt_mirror: str = "auto"
    apt_security_mirror: str = "auto"
    apt_cache_port: int = 3142
    # Guests.
    imds_port: int = 80
    pvgrub_flavor: str = "pvgrub2"
    # Legacy PV-GRUB (GRUB 0.97 from Xen's stubdom): prebuilt pv-grub-x86_64.gz
    # images on this machine, or where the tarballs its build needs are (a
    # directory here or an http(s) URL); one image serves both variants.
    pvgrub_legacy_image_hd0: str = ""
    pvgrub_legacy_image_hd00: str = ""
    pvgrub_legacy_sources: str = ""
    instance_type: str = "m1.small"
    guest_memory: int = 0
    region: str = "us-east-1"
    # Existing Xen hosts (an Ansible inventory with a [xen_hosts] group) for
    # `invoke provision --inventory` and `--host NAME`; empty: the Vagrant VM only.
    inventory: str = ""
    cache_dir: Path = field(default_factory=_default_cache_dir)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def mgmt_host_address(self) -> str:
        return str(next(ipaddress.ip_network(self.mgmt_network).hosts()))

    @property
    def bridge_address(self) -> str:
        return str(next(ipaddress.ip_network(self.bridge_network).hosts()))

    @property
    def bridge_prefixlen(self) -> int:
        return ipaddress.ip_network(self.bridge_network).prefixlen

    @property
    def mgmt_network_name(self) -> str:
        return f"{self.name_prefix}-mgmt"

    @property
    def domain_name(self) -> str:
        return f"{self.name_prefix}-dom0"

    @property
    def serial_log(self) -> str:
        return f"/var/log/libvirt/qemu/{self.domain_name}-serial.log"

    @property
    def apt_proxy(self) -> str:
        return f"http://{self.mgmt_host_address}:{self.apt_cache_port}"

    @property
    def pvgrub_legacy_images(self) -> dict[str, Path]:
        """Variant -> prebuilt legacy PV-GRUB image; one named image serves both.

        Legacy PV-GRUB finds menu.lst through the xl `extra=` string, so the
        same image boots hd0 and hd00 volumes.
        """
        named = {
            variant: Path(path)
            for variant, path in (
                ("hd0", self.pvgrub_legacy_image_hd0),
                ("hd00", self.pvgrub_legacy_image_hd00),
            )
            if path
        }
        if len(named) == 1:
            (image,) = named.values()
            return {"hd0": image, "hd00": image}
        return named

    @property
    def pvgrub_legacy_sources_is_url(self) -> bool:
        return self.pvgrub_legacy_sources.startswith(("http://", "https://"))

    def as_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"
        }

    def describe(self) -> list[str]:
        """One line per setting: its name, its value and where the value comes from."""
        return [
            f"{key:26} {str(value):40} {self.sources.get(key, 'default')}"
            for key, value in self.as_dict().items()
        ]


_CHOICES = {
    "provider": ("libvirt", "virtualbox"),
    "accel": ("auto", "kvm", "qemu"),
    "pvgrub_flavor": ("pvgrub2", "legacy"),
}
_TEST_NET = ipaddress.ip_network("198.18.0.0/15")
# Settings that name files or directories on this machine (the controller).
_CONTROLLER_PATHS = (
    "pvgrub_legacy_image_hd0",
    "pvgrub_legacy_image_hd00",
    "pvgrub_legacy_sources",
)


def _convert(name: str, raw: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "Path":
            return Path(str(raw)).expanduser()
        return str(raw)
    except ValueError:
        raise SettingsError(
            f"{origin}: {name} must be {'a whole number' if kind == 'int' else kind}, "
            f"not {raw!r}."
        ) from None


def _validate(settings: Settings) -> None:
    for name, allowed in _CHOICES.items():
        value = getattr(settings, name)
        if value not in allowed:
            raise SettingsError(
                f"{settings.sources.get(name, 'default')}: {name} must be one of "
                f"{', '.join(allowed)}, not {value!r}."
            )
    for name in ("mgmt_network", "bridge_network"):
        try:
            net = ipaddress.ip_network(getattr(settings, name))
        except ValueError:
            raise SettingsError(
                f"{settings.sources.get(name, 'default')}: {name} must be a network "
                f"like 198.18.0.0/24, not {getattr(settings, name)!r}."
            ) from None
        if not net.subnet_of(_TEST_NET):
            raise SettingsError(
                f"{settings.sources.get(name, 'default')}: {name} must lie inside "
                "198.18.0.0/15 so the VM networks never collide with a real one."
            )
    if not re.fullmatch(r"[a-z][a-z0-9]{1,9}", settings.name_prefix):
        raise SettingsError(
            f"{settings.sources.get('name_prefix', 'default')}: name_prefix must be "
            f"2-10 lower-case letters or digits starting with a letter, not "
            f"{settings.name_prefix!r}."
        )
    _validate_legacy_sources(settings)
    if settings.public_network and not settings.public_network_interface:
        raise SettingsError(
            "public_network is on but public_network_interface names no host "
            "interface; set it to the interface to bridge (this exposes the VM)."
        )
    for name in ("vm_memory", "vm_cpus", "dom0_memory"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{name} must be positive.")
    if settings.dom0_memory + 512 > settings.vm_memory:
        raise SettingsError(
            f"vm_memory ({settings.vm_memory} MiB) must exceed dom0_memory "
            f"({settings.dom0_memory} MiB) by at least 512 MiB to leave room for "
            "guests."
        )


def _validate_legacy_sources(settings: Settings) -> None:
    sources = settings.pvgrub_legacy_sources
    if "://" in sources and not settings.pvgrub_legacy_sources_is_url:
        raise SettingsError(
            f"{settings.sources.get('pvgrub_legacy_sources', 'default')}: "
            "pvgrub_legacy_sources must be a directory on this machine or an "
            f"http:// or https:// URL, not {sources!r}."
        )


def _resolve_paths(settings: Settings, root: Path) -> None:
    """Controller paths as absolute paths: relative ones count from pvlab.yml's
    directory, so Ansible, which runs elsewhere, finds the same files."""
    for name in _CONTROLLER_PATHS:
        value = getattr(settings, name)
        if not value or "://" in value:
            continue
        setattr(settings, name, str((root / Path(value).expanduser()).resolve()))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        # The context mark is where the broken construct starts, which is the line
        # to fix; the problem mark can be the end of the file.
        mark = exc.context_mark or exc.problem_mark
        line = mark.line + 1 if mark else "?"
        raise SettingsError(
            f"{path}:{line}: not valid YAML ({exc.problem}); fix that line."
        ) from None
    except OSError as exc:
        raise SettingsError(f"{path} cannot be read: {exc.strerror}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must be a mapping of setting: value.")
    return data


def _line_of(path: Path, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(str(key))}\s*:")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def load(
    root: Path = PROJECT_ROOT,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Settings from defaults < pvlab.yml < PVLAB_* environment < flags."""
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings)} - {"sources"}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in known}

    path = root / SETTINGS_FILE
    if path.exists():
        for key, raw in _read_file(path).items():
            line = _line_of(path, key)
            origin = f"{path}:{line}" if line else str(path)
            if key not in known:
                raise SettingsError(
                    f"{origin}: unknown setting {key!r}; `invoke settings` lists "
                    "the known ones."
                )
            values[key] = _convert(key, raw, origin)
            sources[key] = origin

    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_SETTINGS:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in known:
            raise SettingsError(
                f"environment variable {var} names no setting; unset it or use one "
                "that `invoke settings` lists."
            )
        values[key] = _convert(key, raw, var)
        sources[key] = f"env {var}"

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        values[key] = _convert(key, raw, f"--{key.replace('_', '-')}")
        sources[key] = "flag"

    settings = dataclasses.replace(Settings(), **values)
    settings.sources = sources
    _resolve_paths(settings, root)
    _validate(settings)
    return settings


# Variables with the prefix that configure pvlab's runtime rather than settings.
_ENV_NOT_SETTINGS = {"PVLAB_VAGRANT_SETTINGS", "PVLAB_LOG"}
