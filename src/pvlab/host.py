"""The host side: packages, libvirt daemons, the isolated VM network and the apt cache.

Where PID 1 is not systemd (containers, CI machines) pvlab starts the daemons itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pvlab.errors import HostError
from pvlab.settings import Settings
from pvlab.shell import CommandError, run, succeeds

log = logging.getLogger(__name__)

LIBVIRT_URI = "qemu:///system"
STORAGE_POOL = "default"
STORAGE_POOL_DIR = "/var/lib/libvirt/images"

# Debian packages the host needs, by the command or file that proves each present.
HOST_PACKAGES = {
    "vagrant": "/usr/bin/vagrant",
    "vagrant-libvirt": "/usr/share/rubygems-integration/all/specifications",
    "libvirt-daemon-system": "/usr/sbin/libvirtd",
    "libvirt-clients": "/usr/bin/virsh",
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "qemu-utils": "/usr/bin/qemu-img",
    "dnsmasq-base": "/usr/sbin/dnsmasq",
    "debootstrap": "/usr/sbin/debootstrap",
    "apt-cacher-ng": "/usr/sbin/apt-cacher-ng",
    "fdisk": "/usr/sbin/sfdisk",
    "grub-pc-bin": "/usr/lib/grub/i386-pc/boot.img",
    "e2fsprogs": "/usr/sbin/debugfs",
    "cpio": "/usr/bin/cpio",
    "openssh-client": "/usr/bin/ssh",
    "gdb": "/usr/bin/gdb",
}


def _installed(package: str) -> bool:
    result = run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False
    )
    return result.returncode == 0 and result.stdout.strip() == "installed"


def missing_packages() -> list[str]:
    return [name for name in HOST_PACKAGES if not _installed(name)]


def ensure_packages(progress=log.info) -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise HostError(
            f"missing host packages: {' '.join(missing)}; install them with "
            f"`sudo apt-get install {' '.join(missing)}`."
        )
    progress(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise HostError(
                f"`{' '.join(argv[:2])}` failed ({' '.join(tail)}); check the host's "
                "apt configuration and network."
            )


def systemd_is_init() -> bool:
    return Path("/run/systemd/system").is_dir()


def _libvirt_answers() -> bool:
    return succeeds(["virsh", "-c", LIBVIRT_URI, "uri"], timeout=15)


def ensure_libvirt(progress=log.info) -> None:
    """libvirtd and virtlogd running, started by pvlab where no systemd does it."""
    if _libvirt_answers():
        return
    if systemd_is_init():
        progress("starting libvirtd with systemd")
        run(["systemctl", "start", "virtlogd", "libvirtd"], check=False)
    elif os.geteuid() == 0:
        progress("starting virtlogd and libvirtd (no systemd here)")
        for daemon in ("virtlogd", "libvirtd"):
            if not _daemon_running(daemon):
                run([daemon, "-d"], check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _libvirt_answers():
            return
        time.sleep(0.5)
    raise HostError(
        "libvirtd is not running and could not be started; start it "
        "(`sudo libvirtd -d` or `sudo systemctl start libvirtd`) and try again."
    )


def _daemon_running(name: str) -> bool:
    pidfile = Path(f"/run/{name}.pid")
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["virsh", "-c", LIBVIRT_URI, *args], check=check)


def ensure_storage_pool(progress=log.info) -> None:
    info = virsh("pool-info", STORAGE_POOL, check=False)
    if info.returncode != 0:
        progress(f"defining libvirt storage pool {STORAGE_POOL}")
        virsh("pool-define-as", STORAGE_POOL, "dir", "--target", STORAGE_POOL_DIR)
        virsh("pool-build", STORAGE_POOL)
        info = virsh("pool-info", STORAGE_POOL)
    if "running" not in info.stdout:
        virsh("pool-start", STORAGE_POOL)
    virsh("pool-autostart", STORAGE_POOL, check=False)


def mgmt_network_xml(settings: Settings) -> str:
    import ipaddress

    net = ipaddress.ip_network(settings.mgmt_network)
    hosts = list(net.hosts())
    # No <forward> element: an isolated network, nothing routed to the outside.
    return f"""<network>
  <name>{settings.mgmt_network_name}</name>
  <bridge name='{settings.name_prefix}br0' stp='on' delay='0'/>
  <ip address='{hosts[0]}' netmask='{net.netmask}'>
    <dhcp>
      <range start='{hosts[len(hosts) // 2]}' end='{hosts[-1]}'/>
    </dhcp>
  </ip>
</network>
"""


def ensure_mgmt_network(settings: Settings, progress=log.info) -> None:
    name = settings.mgmt_network_name
    info = virsh("net-info", name, check=False)
    if info.returncode != 0:
        progress(f"defining isolated libvirt network {name} "
                 f"({settings.mgmt_network}, no forwarding)")
        path = Path(settings.cache_dir) / f"{name}.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(mgmt_network_xml(settings))
        virsh("net-define", str(path))
        info = virsh("net-info", name)
    if _line_value(info.stdout, "Active") == "yes" and not _network_dhcp_running(name):
        # libvirtd restarted after its dnsmasq was killed (as when a CI run
        # follows a session): the network looks active but hands out no
        # addresses, so the VM would never get one.
        progress(f"restarting libvirt network {name} (its DHCP had died)")
        virsh("net-destroy", name, check=False)
        info = virsh("net-info", name)
    if not _line_value(info.stdout, "Active") == "yes":
        virsh("net-start", name)


def _network_dhcp_running(name: str) -> bool:
    pidfile = Path(f"/run/libvirt/network/{name}.pid")
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _line_value(text: str, key: str) -> str:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


@dataclass
class AptCache:
    """apt-cacher-ng bound to the host's address on the isolated VM network only."""

    settings: Settings

    @property
    def base(self) -> Path:
        prefix = self.settings.name_prefix
        suffix = "" if prefix == "pvlab" else f"-{prefix}"
        return Path(self.settings.cache_dir) / f"apt-cacher-ng{suffix}"

    @property
    def pidfile(self) -> Path:
        return self.base / "apt-cacher-ng.pid"

    def is_listening(self) -> bool:
        try:
            with socket.create_connection(
                (self.settings.mgmt_host_address, self.settings.apt_cache_port), 2
            ):
                return True
        except OSError:
            return False

    def ensure(self, progress=log.info) -> None:
        if self.is_listening():
            return
        progress(f"starting apt cache on {self.settings.apt_proxy} for the VM")
        for sub in ("cache", "log", "conf"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("cache", "log"):
            shutil.chown(self.base / sub, "apt-cacher-ng", "apt-cacher-ng")
        # Our own configuration without the packaged Remap rules: those send
        # Debian requests to a fixed backend list instead of the mirror the VM
        # asked for, which is the host's own mirror.
        (self.base / "conf" / "acng.conf").write_text(
            "SupportDir: /usr/lib/apt-cacher-ng\n"
            "ReportPage: acng-report.html\n"
        )
        try:
            run([
                "/usr/sbin/apt-cacher-ng",
                "-c", str(self.base / "conf"),
                "ForeGround=0",
                f"BindAddress={self.settings.mgmt_host_address}",
                f"Port={self.settings.apt_cache_port}",
                f"CacheDir={self.base / 'cache'}",
                f"LogDir={self.base / 'log'}",
                f"PidFile={self.pidfile}",
                f"SocketPath={self.base / 'socket'}",
                "ExThreshold=4",
            ])
        except CommandError as exc:
            raise HostError(
                f"the apt cache did not start ({exc.stderr or exc}); see "
                f"{self.base / 'log'}."
            ) from None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.is_listening():
                return
            time.sleep(0.3)
        raise HostError(
            f"the apt cache is not listening on {self.settings.apt_proxy}; see "
            f"{self.base / 'log'}."
        )

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass


def cpu_has_hw_virt(cpuinfo: str) -> bool:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "vmx" in flags or "svm" in flags
    return False


def detect_accel(requested: str = "auto") -> str:
    """'kvm' if the CPU has hardware virtualisation and /dev/kvm works, else 'qemu'."""
    if requested != "auto":
        return requested
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if cpu_has_hw_virt(cpuinfo) and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    log.info(
        "no usable hardware virtualisation (no vmx/svm CPU flag); the dom0 VM runs "
        "under QEMU emulation (TCG): slower, but it works"
    )
    return "qemu"


def prepare(settings: Settings, progress=log.info) -> None:
    """Everything on the host that `vagrant up` relies on."""
    ensure_packages(progress)
    ensure_libvirt(progress)
    ensure_storage_pool(progress)
    ensure_mgmt_network(settings, progress)
    AptCache(settings).ensure(progress)


def project_domains(settings: Settings) -> list[tuple[str, str]]:
    """(name, uuid) of every libvirt domain with pvlab's name prefix."""
    out = virsh("list", "--all", "--name", check=False).stdout
    domains = []
    for name in out.split():
        if name.startswith(f"{settings.name_prefix}-"):
            uuid = virsh("domuuid", name, check=False).stdout.strip()
            domains.append((name, uuid))
    return domains


def remove_domain(name: str, progress=log.info) -> None:
    """Stop and undefine a pvlab domain and delete its disks from the pool."""
    progress(f"removing libvirt domain {name} and its disks")
    virsh("destroy", name, check=False)
    virsh("undefine", name, "--remove-all-storage", "--nvram", check=False)
    virsh("undefine", name, "--remove-all-storage", check=False)
    for volume in virsh("vol-list", STORAGE_POOL, check=False).stdout.split():
        if volume.startswith(f"{name}.") or volume.startswith(f"{name}-"):
            virsh("vol-delete", volume, "--pool", STORAGE_POOL, check=False)


def remove_box_volumes(settings: Settings, progress=log.info) -> None:
    """Delete the copies of base boxes vagrant-libvirt uploaded to the storage
    pool under this prefix (it names them <prefix>-<box>_vagrant_box_image_...)."""
    for volume in virsh("vol-list", STORAGE_POOL, check=False).stdout.split():
        if volume.startswith(f"{settings.name_prefix}-") and "_vagrant_box_image_" in (
            volume
        ):
            progress(f"removing the box's copy {volume} from the storage pool")
            virsh("vol-delete", volume, "--pool", STORAGE_POOL, check=False)


def remove_mgmt_network(settings: Settings, progress=log.info) -> None:
    name = settings.mgmt_network_name
    if virsh("net-info", name, check=False).returncode == 0:
        progress(f"removing libvirt network {name}")
        virsh("net-destroy", name, check=False)
        virsh("net-undefine", name, check=False)
