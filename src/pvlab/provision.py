"""`invoke provision`: host checks, base box, `vagrant up`, then the Ansible roles."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pvlab import box, host
from pvlab.errors import VmError
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
    import ipaddress

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
    dom0: Dom0,
    settings: Settings,
    playbook: Path = PLAYBOOK,
    progress=log.info,
    quiet: bool = False,
) -> Recap:
    """Apply the playbook; its output streams, or with quiet shows only on failure."""
    inventory = dom0.ansible_inventory()
    vars_file = dom0.state_dir / "pvlab-ansible.json"
    vars_file.write_text(json.dumps(extra_vars(settings, progress), indent=2))
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
    held: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if quiet:
                held.append(line)
            else:
                print(line, end="", flush=True)
            match = RECAP_RE.match(line.strip())
            if match:
                recap = Recap(*(int(g) for g in match.groups()[1:]))
        code = proc.wait()
    if code != 0 or recap is None or recap.failed or recap.unreachable:
        print("".join(held), end="", flush=True)
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


def provision(settings: Settings, progress=log.info, quiet: bool = False) -> Recap:
    started = time.monotonic()
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
    recap = run_playbook(dom0, settings, progress=progress, quiet=quiet)
    progress(
        f"dom0 provisioned: {recap.ok} ok, {recap.changed} changed "
        f"({time.monotonic() - started:.0f} s)"
    )
    return recap
