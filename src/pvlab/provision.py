"""`invoke provision`: host checks, base box, `vagrant up`, then the Ansible roles."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from pvlab import box, host, shell
from pvlab import image as image_mod
from pvlab.errors import HostError, SettingsError, VmError
from pvlab.settings import PROJECT_ROOT, Settings
from pvlab.vm import Dom0

log = logging.getLogger(__name__)

PLAYBOOK = PROJECT_ROOT / "playbooks" / "site.yml"
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                      r"failed=(\d+)")
TASK_RE = re.compile(r"^TASK \[(?:[^\]]+ : )?(.+?)\] \**$")
FATAL_RE = re.compile(r"^fatal: \[[^\]]+\]: FAILED! => (\{.*\})$")
# Role tasks that stop on a user's mistake with a one-sentence fix of their own:
# their message becomes pvlab's error instead of "see above".
SETTINGS_CHECK_TASKS = frozenset(
    ("Stop if a tarball of the legacy PV-GRUB build is missing.",)
)
LEGACY_IMAGE_SETTINGS = {
    "hd0": "pvgrub_legacy_image_hd0",
    "hd00": "pvgrub_legacy_image_hd00",
}
# Xen's pv-grub-x86_64.gz is about 1 MiB; a file this large is something else.
MAX_PVGRUB_IMAGE = 64 * 1024 * 1024


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


def xen_release(xen_version: str) -> str:
    """The upstream Xen release of a Debian version: 4.17.5 of 4.17.5+72-g0114-1."""
    match = re.match(r"^(?:\d+:)?(\d+\.\d+(?:\.\d+)?)", xen_version)
    if not match:
        raise VmError(f"{xen_version!r} is not a Debian version of Xen.")
    return match.group(1)


def check_legacy_image(path: Path, setting: str) -> image_mod.Kernel:
    """A prebuilt legacy PV-GRUB image as Xen will load it, or a SettingsError.

    Xen's pv-grub-x86_64.gz is a gzip-compressed x86_64 ELF with Xen notes.
    """
    fix = f"set {setting} to the pv-grub-x86_64.gz of a Xen stubdom build"
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise SettingsError(f"{setting} names {path}, which is not a file; {fix}.")
        if size > MAX_PVGRUB_IMAGE:
            raise SettingsError(
                f"{setting} names {path}, {size >> 20} MiB, far too large for a "
                f"PV-GRUB image; {fix}."
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"{setting} names {path}, which cannot be read ({exc.strerror}); {fix}."
        ) from None
    kernel = image_mod.Kernel.from_bytes(data)
    what = f"{setting} names {path}, {_a(kernel.description)}"
    problem = kernel.problem or "a file of unknown format"
    if kernel.format == "unknown" and problem.startswith("its "):
        raise SettingsError(f"{setting} names {path}, but {problem}; {fix}.")
    if kernel.format == "unknown":
        what = f"{setting} names {path}, {problem}"
    if kernel.format != "elf" or kernel.wrapper not in (None, "gzip"):
        raise SettingsError(
            f"{what}, whereas Xen's PV-GRUB image is an ELF or a gzip-compressed "
            f"ELF; {fix}."
        )
    if kernel.problem:
        raise SettingsError(f"{what} that Xen cannot load: {kernel.problem}; {fix}.")
    if not kernel.is_x86_64:
        raise SettingsError(
            f"{what} for {kernel.elf_class}-bit {kernel.machine}, not x86_64, and "
            f"pvlab boots only x86_64 guests; {fix} for x86_64."
        )
    if not kernel.has_xen_notes:
        raise SettingsError(
            f"{what} without Xen ELF notes or a __xen_guest section, so Xen would "
            f"refuse to start it as a PV guest; {fix}."
        )
    guest_os = kernel.xen_notes.get("GUEST_OS")
    if guest_os != "Mini-OS":
        # Xen's PV-GRUB is a Mini-OS application; anything else may still boot.
        log.warning(
            "%s: its Xen notes name the guest OS %r, not Mini-OS as Xen's "
            "pv-grub does; using it anyway",
            path,
            guest_os,
        )
    return kernel


def _a(description: str) -> str:
    return f"{'an' if description[0] in 'aeiouxEU' else 'a'} {description}"


def check_pvgrub_settings(settings: Settings) -> dict[str, Path]:
    """Check the legacy PV-GRUB settings before anything is created.

    Returns variant -> prebuilt image to install (empty when none is named).
    """
    named = {
        setting: Path(getattr(settings, setting))
        for setting in LEGACY_IMAGE_SETTINGS.values()
        if getattr(settings, setting)
    }
    for setting, path in named.items():
        check_legacy_image(path, setting)
    if settings.pvgrub_flavor == "legacy" and not named and not (
        settings.pvgrub_legacy_sources
    ):
        raise SettingsError(
            "pvgrub_flavor is legacy but neither pvgrub_legacy_image_hd0 nor "
            "pvgrub_legacy_sources is set; name a prebuilt pv-grub-x86_64.gz "
            "with the first or the directory or URL of the stubdom tarballs with "
            "the second (README.md, \"Legacy PV-GRUB\")."
        )
    return settings.pvgrub_legacy_images


def pvgrub_vars(settings: Settings, xen_version: str, progress=log.info) -> dict:
    """The pvgrub role's variables: which legacy PV-GRUB to install and how."""
    images = check_pvgrub_settings(settings)
    build = settings.pvgrub_flavor == "legacy" and not images
    variables = {
        "pvgrub_flavor": settings.pvgrub_flavor,
        "pvgrub_legacy_images": {variant: str(p) for variant, p in images.items()},
        "pvgrub_legacy_build": build,
        "pvgrub_legacy_sources": settings.pvgrub_legacy_sources,
        "pvgrub_legacy_xen_release": xen_release(xen_version),
        "pvgrub_legacy_download_dir": str(Path(settings.cache_dir) / "pvgrub-legacy"),
        "pvgrub_legacy_xen_source": [],
    }
    if build:
        variables["pvgrub_legacy_xen_source"] = [
            str(path) for path in xen_source_files(settings, xen_version, progress)
        ]
    return variables


def xen_source_files(settings: Settings, xen_version: str, progress=log.info):
    """The Debian source package of dom0's Xen on this machine, .dsc first."""
    from pvlab import xen_debug

    mirror, security = mirrors(settings)
    cache_dir = Path(settings.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dsc = xen_debug.fetch_source(
        cache_dir,
        xen_version,
        mirror=mirror,
        security_mirror=security,
        log_path=cache_dir / "xen-source.log",
        progress=progress,
    )
    return [dsc, *(dsc.parent / name for name in xen_debug._dsc_files(dsc))]


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
        **pvgrub_vars(settings, debug.version, progress),
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
    quiet: bool = False,
) -> Recap:
    """Apply the playbook to the Vagrant VM, or to the hosts of an inventory; its
    output streams, or with quiet shows only on failure."""
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
        shell.ansible_command("ansible-playbook"),
        "-i", str(inventory), "-e", f"@{vars_file}", str(playbook),
    ]
    log.debug("run: %s", " ".join(argv))
    recap = None
    output: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if not quiet:
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
        if quiet:
            print("".join(output), end="", flush=True)
        message = settings_failure(output)
        if message:
            raise SettingsError(message)
        raise VmError(
            "provisioning dom0 failed (the failing task is printed above); fix it "
            "and run `invoke provision` again, it resumes where it stopped."
        )
    return recap


def settings_failure(lines: list[str]) -> str | None:
    """The message of a failed settings check in ansible-playbook's output, if any.

    Ansible's default output names each task in a `TASK [role : name]` line and
    prints a failure as `fatal: [host]: FAILED! => {json}`.
    """
    task = None
    for line in lines:
        line = line.rstrip("\n")
        match = TASK_RE.match(line)
        if match:
            task = match.group(1)
            continue
        match = FATAL_RE.match(line)
        if match and task in SETTINGS_CHECK_TASKS:
            try:
                message = json.loads(match.group(1)).get("msg")
            except ValueError:
                return None
            return " ".join(str(message).split()) if message else None
    return None


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


def refuse_foreign_domain(settings: Settings, dom0: Dom0) -> None:
    """`vagrant up` cannot create the VM when a libvirt domain of its name exists
    that this checkout's Vagrant state does not own (another checkout's dom0, or
    one whose .vagrant was deleted); say so before, with the way out."""
    owned = dom0.libvirt_uuid()
    for name, uuid in host.project_domains(settings):
        if name == settings.domain_name and uuid != owned:
            raise VmError(
                f"a libvirt domain named {name} already exists that this checkout "
                "did not create (another checkout's dom0, or a leftover); remove it "
                "with `invoke clean --stale`, or set another name_prefix here."
            )


def provision(settings: Settings, progress=log.info, quiet: bool = False) -> Recap:
    started = time.monotonic()
    # Before anything is created: a bad provider, box, image or setting stops
    # here, not halfway.
    check_provider(settings)
    images = check_pvgrub_settings(settings)
    if images:
        progress(
            "legacy PV-GRUB: "
            + ", ".join(f"{variant} from {path}" for variant, path in images.items())
        )
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
    if state == "not_created" and settings.provider == "libvirt":
        refuse_foreign_domain(settings, dom0)
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
