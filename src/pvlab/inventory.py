"""Existing Xen hosts from an Ansible inventory, provisioned and used like the VM.

The inventory is read with `ansible-inventory` (the pinned ansible-core's own
parser), so INI, YAML and plugin inventories all work. The roles rewrite a host's
networking, so this machine itself is refused as a target.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pvlab import shell
from pvlab.errors import SettingsError, VmError
from pvlab.settings import Settings
from pvlab.vm import Dom0

log = logging.getLogger(__name__)

GROUP = "xen_hosts"


@dataclass(frozen=True)
class XenHost:
    name: str
    address: str
    port: int
    user: str
    key_file: str | None
    connection: str


def read(path: Path) -> dict[str, XenHost]:
    """The hosts of the inventory's xen_hosts group, by name."""
    if not path.is_file():
        raise SettingsError(f"inventory {path} does not exist; give an Ansible "
                            "inventory file with a [xen_hosts] group.")
    result = subprocess.run(
        [shell.ansible_command("ansible-inventory"), "-i", str(path), "--list"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SettingsError(f"inventory {path} cannot be read by Ansible ({last}).")
    data = json.loads(result.stdout)
    names = data.get(GROUP, {}).get("hosts", [])
    if not names:
        raise SettingsError(
            f"inventory {path} has no hosts in a [{GROUP}] group; list the Xen "
            "hosts to provision under that group."
        )
    hostvars = data.get("_meta", {}).get("hostvars", {})
    hosts = {}
    for name in names:
        v = hostvars.get(name, {})
        hosts[name] = XenHost(
            name=name,
            address=str(v.get("ansible_host", name)),
            port=int(v.get("ansible_port", 22)),
            user=str(v.get("ansible_user", "root")),
            key_file=v.get("ansible_ssh_private_key_file"),
            connection=str(v.get("ansible_connection", "ssh")),
        )
    return hosts


def _own_addresses() -> set[ipaddress._BaseAddress]:
    result = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True,
                            check=False)
    addresses = set()
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            addresses.add(ipaddress.ip_address(info["local"]))
    return addresses


def refuse_this_machine(hosts: dict[str, XenHost]) -> None:
    """The roles rewrite networking: never let them run on the controller."""
    own = _own_addresses()
    for host in hosts.values():
        if host.connection == "local":
            raise SettingsError(
                f"inventory host {host.name} uses a local connection; pvlab's roles "
                "rewrite networking and never run on this machine."
            )
        try:
            resolved = {
                ipaddress.ip_address(info[4][0])
                for info in socket.getaddrinfo(host.address, host.port)
            }
        except socket.gaierror:
            raise SettingsError(
                f"inventory host {host.name}: {host.address} does not resolve; fix "
                "its ansible_host."
            ) from None
        if any(a.is_loopback or a in own for a in resolved):
            raise SettingsError(
                f"inventory host {host.name} ({host.address}) is this machine; "
                "pvlab's roles rewrite networking and never run on the controller."
            )


def pick(path: Path, name: str) -> XenHost:
    hosts = read(path)
    if name not in hosts:
        raise SettingsError(
            f"host {name} is not in the [{GROUP}] group of {path}; it has "
            f"{', '.join(sorted(hosts))}."
        )
    refuse_this_machine({name: hosts[name]})
    return hosts[name]


@dataclass
class InventoryDom0(Dom0):
    """A provisioned Xen host from an inventory, reached over plain SSH."""

    host: XenHost | None = None

    @property
    def ssh_config_file(self) -> Path:
        assert self.host is not None
        return self.state_dir / f"pvlab-host-{self.host.name}-ssh-config"

    def ssh_config(self) -> Path:
        host = self.host
        assert host is not None
        self.state_dir.mkdir(exist_ok=True)
        lines = [
            "Host dom0",
            f"  HostName {host.address}",
            f"  Port {host.port}",
            f"  User {host.user}",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
        ]
        if host.key_file:
            lines.append(f"  IdentityFile {Path(host.key_file).expanduser()}")
        self.ssh_config_file.write_text("\n".join(lines) + "\n")
        return self.ssh_config_file

    def status(self) -> str:
        return "running"

    def lost(self, what: str) -> VmError:
        assert self.host is not None
        return VmError(
            f"lost Xen host {self.host.name} while {what}: it does not answer over "
            "SSH; check that it is up and reachable."
        )


def dom0_for(settings: Settings, path: Path, name: str) -> InventoryDom0:
    return InventoryDom0(settings, host=pick(path, name))
