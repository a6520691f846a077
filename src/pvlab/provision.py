"""`invoke provision`: host checks, base box, `vagrant up`, then the Ansible roles."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from pvlab import box, host
from pvlab.errors import HostError, SettingsError, VmError
from pvlab.settings import PROJECT_ROOT, Settings
from pvlab.vm import Dom0

log = logging.getLogger(__name__)

PLAYBOOK = PROJECT_ROOT / "playbooks" / "site.yml"
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                      r"failed=(\d+)")


@dataclass
class Recap:
    ok: int
    changed: int
    unreachable: int
    failed: int


def mirrors(settings: Settings) -> tuple[str, str | None]:
    mirror = settings.apt_mirror
    if mirror == "auto":
        mirror = box.mirror_from_host()
    security = settings.apt_security_mirror
    if security == "auto":
        security = box.security_mirror_from_host()
    return mirror, security or None


def debug_xen(settings: Settings, progress=log.info):
    """The gdbsx hypervisor and tool for the Xen version dom0 is pinned to."""
    from pvlab import xen_debug

    mirror, security = mirrors(settings)
    version = xen_debug.suite_version()
    cached = xen_debug.cached_debug_xen(Path(settings.cache_dir), version)
    if cached:
        return cached
    progress(f"building Xen {version} with gdbsx support on the host (about 3 min)")
    xen_debug.ensure_build_deps(progress)
    return xen_debug.build_debug_xen(
        Path(settings.cache_dir), version, progress,
        mirror=mirror, security_mirror=security,
    )


def extra_vars(settings: Settings, progress=log.info) -> dict:
    mirror, security = mirrors(settings)
    bridge = ipaddress.ip_network(settings.bridge_network)
    debug = debug_xen(settings, progress)
    return {
        # dom0 runs the release suite's Xen: the one whose source the gdbsx
        # hypervisor is built from (the security suite serves no sources here).
        "xen_host_version": debug.version,
        **debug.role_vars(),
        "apt_source_proxy": settings.apt_proxy,
        "apt_source_mirror": mirror,
        "apt_source_security_mirror": security or "",
        "xen_host_dom0_memory_mb": settings.dom0_memory,
        "xen_bridge_address": settings.bridge_address,
        "xen_bridge_prefixlen": bridge.prefixlen,
        "xen_bridge_netmask": str(bridge.netmask),
        "pvgrub_flavor": settings.pvgrub_flavor,
        "imds_listen_address": settings.bridge_address,
        "imds_listen_port": settings.imds_port,
        "imds_region": settings.region,
    }


def check_provider(settings: Settings) -> None:
    """Refuse a provider or box this host lacks, before anything is created."""
    if settings.provider == "virtualbox" and not shutil.which("VBoxManage"):
        raise HostError(
            "provider is virtualbox but VirtualBox is not installed (no VBoxManage "
            "on PATH); install it, or set provider: libvirt."
        )
    if settings.provider == "virtualbox" and settings.box_build:
        raise SettingsError(
            "the box pvlab builds is a libvirt box; with provider virtualbox set "
            "box_build: false and box_name to a Debian 12 VirtualBox box you added "
            "with `vagrant box add`."
        )
    if not settings.box_build and not box_added(settings.box_name, settings.provider):
        raise SettingsError(
            f"box {settings.box_name} for {settings.provider} is not added to "
            "Vagrant and box_build is off; add it with `vagrant box add`, or set "
            "box_build: true to have pvlab build it."
        )


def box_added(name: str, provider: str) -> bool:
    """Whether Vagrant has a box of this name for this provider, any version."""
    boxes = box.vagrant_box_dir(name, provider).parents[1]
    return any(path.is_dir() for path in boxes.glob(f"*/{provider}"))


def ensure_box(settings: Settings, progress=log.info) -> None:
    if not settings.box_build:
        return
    mirror, security = mirrors(settings)
    path = box.build_box(
        Path(settings.cache_dir) / "boxes",
        mirror,
        security_mirror=security,
        progress=progress,
    )
    box.add_box(path, settings.box_name, progress=progress)


def run_playbook(
    dom0: Dom0 | None,
    settings: Settings,
    playbook: Path = PLAYBOOK,
    progress=log.info,
    *,
    inventory: Path | None = None,
    apt_proxy: bool = True,
) -> Recap:
    """Apply the playbook to the Vagrant VM, or to the hosts of an inventory."""
    if inventory is None:
        assert dom0 is not None
        inventory = dom0.ansible_inventory()
    state_dir = PROJECT_ROOT / ".vagrant"
    state_dir.mkdir(exist_ok=True)
    vars_file = state_dir / "pvlab-ansible.json"
    variables = extra_vars(settings, progress)
    if not apt_proxy:
        variables["apt_source_proxy"] = ""
    vars_file.write_text(json.dumps(variables, indent=2))
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(PROJECT_ROOT / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
    )
    argv = [
        _ansible_playbook(), "-i", str(inventory), "-e", f"@{vars_file}", str(playbook)
    ]
    log.debug("run: %s", " ".join(argv))
    recap = None
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            match = RECAP_RE.match(line.strip())
            if match:
                # One recap line per host: the play's recap is their sum.
                counts = [int(g) for g in match.groups()[1:]]
                if recap is not None:
                    totals = zip(counts, astuple(recap), strict=True)
                    counts = [a + b for a, b in totals]
                recap = Recap(*counts)
        code = proc.wait()
    if code != 0 or recap is None or recap.failed or recap.unreachable:
        raise VmError(
            "provisioning dom0 failed (the failing task is printed above); fix it "
            "and run `invoke provision` again, it resumes where it stopped."
        )
    return recap


def _ansible_playbook() -> str:
    # The ansible-core pinned with pvlab, next to this interpreter, wins over any
    # other on PATH.
    beside = Path(sys.executable).parent / "ansible-playbook"
    return str(beside) if beside.exists() else "ansible-playbook"


def provision_inventory(
    settings: Settings, path: Path, progress=log.info
) -> Recap:
    """The same roles on existing Xen hosts over SSH; never on this machine."""
    from pvlab import inventory

    started = time.monotonic()
    hosts = inventory.read(path)
    inventory.refuse_this_machine(hosts)
    # The apt cache listens on the VM network only: hosts elsewhere use their own.
    mgmt = ipaddress.ip_network(settings.mgmt_network)
    on_vm_network = all(
        _address_in(h.address, mgmt) for h in hosts.values()
    )
    progress(f"applying the Ansible roles to {', '.join(sorted(hosts))} from {path}")
    recap = run_playbook(
        None, settings, progress=progress, inventory=path, apt_proxy=on_vm_network
    )
    progress(
        f"{len(hosts)} Xen host(s) provisioned: {recap.ok} ok, {recap.changed} "
        f"changed ({time.monotonic() - started:.0f} s)"
    )
    return recap


def _address_in(address: str, network: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


def provision(settings: Settings, progress=log.info) -> Recap:
    started = time.monotonic()
    check_provider(settings)
    if settings.public_network:
        log.warning(
            "public_network is on: the dom0 VM joins the network of host interface "
            "%s and its SSH, IMDS and guests are reachable from it.",
            settings.public_network_interface,
        )
    progress("checking the host")
    host.prepare(settings, progress)
    accel = host.detect_accel(settings.accel)
    dom0 = Dom0(settings, accel=accel)
    ensure_box(settings, progress)
    state = dom0.status()
    if state != "running":
        progress(f"starting the dom0 VM ({accel}, {settings.vm_memory} MiB, "
                 f"{settings.vm_cpus} vCPUs; state was {state})")
        dom0.up()
    else:
        dom0.write_vagrant_settings()
    progress("applying the Ansible roles to dom0")
    recap = run_playbook(dom0, settings, progress=progress)
    progress(
        f"dom0 provisioned: {recap.ok} ok, {recap.changed} changed "
        f"({time.monotonic() - started:.0f} s)"
    )
    return recap
