"""Build the Debian 12 Vagrant box (libvirt provider) that becomes dom0, and add it.

The box is made locally from Debian packages (debootstrap, a hand-made disk image,
GRUB written by hand) because no public box can be downloaded here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pvlab import cache, shell
from pvlab.errors import HostError, SettingsError

log = logging.getLogger(__name__)

SUITE = "bookworm"
SECURITY_SUITE = f"{SUITE}-security"
BOX_NAME = "pvlab/debian12"
# Bump whenever the build steps or the box contents change: it is part of the cache
# key, so a changed script never hands out a box built by an older one.
SCRIPT_VERSION = 1
PACKAGES = (
    # Not linux-image-cloud-amd64: it lacks CONFIG_XEN_DOM0.
    "linux-image-amd64",
    "grub-pc",
    "openssh-server",
    "sudo",
    "python3",
    "ifupdown",
    "isc-dhcp-client",
    "ca-certificates",
    # Vagrant's default synced folder falls back to rsync, which it would otherwise
    # try to install in a VM that has no route to a mirror yet.
    "rsync",
)
DISK_GIB = 20
BLOCK_SIZE = 4096
PARTITION_START = 1 << 20
KERNEL_CMDLINE = "net.ifnames=0 console=ttyS0"
HOSTNAME = "debian12"
# The box's own disk as the VM sees it (virtio); grub-pc reinstalls there on upgrade.
VM_DISK = "/dev/vda"
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"
GRUB_CORE_MODULES = (
    "biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile", "search",
    "search_fs_uuid", "echo", "serial", "terminal", "test", "boot",
)  # fmt: skip
# boot.img's floppy-probe jump; grub-bios-setup turns it into NOPs for hard disks so
# that a BIOS handing over a bad drive number still boots from the first disk.
BOOT_DRIVE_CHECK = 0x66
MBR_CODE_SIZE = 440
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "chroot": "coreutils",
    "sfdisk": "fdisk",
    "mke2fs": "e2fsprogs",
    "grub-mkimage": "grub-common",
    "qemu-img": "qemu-utils",
}
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}

Progress = Callable[[str], object]


# ---------------------------------------------------------------- apt sources


@dataclass(frozen=True)
class AptSource:
    """One repository line of the host's apt configuration."""

    kind: str
    uri: str
    suite: str
    components: tuple[str, ...]
    enabled: bool = True

    def is_debian(self, suite: str) -> bool:
        # https cannot go through the apt proxy the VM uses later.
        # Limitation: a third-party http repository that names Debian's suite with
        # a main component passes too; apt's file order decides between them.
        return (
            self.enabled
            and self.kind == "deb"
            and self.uri.startswith("http://")
            and self.suite == suite
            and "main" in self.components
        )


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Read the classic `deb [options] URI suite component...` format."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        line = re.sub(r"\[[^\]]*\]", " ", line)
        fields = line.split()
        if len(fields) < 3 or fields[0] not in ("deb", "deb-src"):
            continue
        kind, uri, suite, *components = fields
        sources.append(AptSource(kind, uri, suite, tuple(components)))
    return sources


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0].isspace() and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Read the deb822 `.sources` format (Types/URIs/Suites/Components stanzas)."""
    sources = []
    for stanza in _deb822_stanzas(text):
        enabled = stanza.get("enabled", "yes").lower() not in ("no", "false", "0")
        components = tuple(stanza.get("components", "").split())
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                for suite in stanza.get("suites", "").split():
                    sources.append(AptSource(kind, uri, suite, components, enabled))
    return sources


def host_sources(root: Path = Path("/")) -> list[AptSource]:
    """All repositories of the apt configuration under `root`, in apt's order."""
    apt_dir = root / "etc/apt"
    sources = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        sources += parse_one_line_sources(main_list.read_text())
    for path in sorted((apt_dir / "sources.list.d").glob("*")):
        if path.suffix == ".list":
            sources += parse_one_line_sources(path.read_text())
        elif path.suffix == ".sources":
            sources += parse_deb822_sources(path.read_text())
    return sources


def _mirror_for(suite: str, root: Path) -> str | None:
    for source in host_sources(root):
        if source.is_debian(suite):
            return source.uri.rstrip("/")
    return None


def mirror_from_host(root: Path = Path("/")) -> str:
    """The Debian mirror the host's apt uses for bookworm main (plain http)."""
    mirror = _mirror_for(SUITE, root)
    if mirror is None:
        raise SettingsError(
            f"no http source for Debian {SUITE} main in {root / 'etc/apt'}; "
            "set the box mirror in pvlab's settings."
        )
    return mirror


def security_mirror_from_host(root: Path = Path("/")) -> str | None:
    """The host's http mirror for bookworm-security main, or None if it has none."""
    return _mirror_for(SECURITY_SUITE, root)


# ---------------------------------------------------------------- cache key


def cache_key(
    mirror: str,
    *,
    security_mirror: str | None = None,
    ssh_public_key: str = "",
    packages: Iterable[str] = PACKAGES,
    version: int = SCRIPT_VERSION,
) -> str:
    """A short hash of everything that decides the box's contents."""
    inputs = {
        "suite": SUITE,
        "packages": sorted(set(packages)),
        "version": version,
        "mirror": mirror.rstrip("/"),
        "security_mirror": (security_mirror or "").rstrip("/"),
        "ssh_public_key": ssh_public_key.strip(),
        "disk_gib": DISK_GIB,
    }
    text = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def root_uuid(key: str) -> str:
    """The root filesystem's UUID, derived from the cache key so builds repeat."""
    digest = hashlib.sha256(f"root-{key}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


# ---------------------------------------------------------------- file contents


def fstab_text(fs_uuid: str) -> str:
    return (
        "# <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n"
    )


def grub_cfg_text(kernel_version: str, fs_uuid: str) -> str:
    """A first grub.cfg; `update-grub` inside the VM replaces it with Debian's."""
    return f"""\
set default=0
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root {fs_uuid}
menuentry 'Debian GNU/Linux, with Linux {kernel_version}' {{
    linux /boot/vmlinuz-{kernel_version} root=UUID={fs_uuid} ro {KERNEL_CMDLINE}
    initrd /boot/initrd.img-{kernel_version}
}}
"""


def default_grub_text(existing: str) -> str:
    """Debian's /etc/default/grub with the serial console and the kernel options."""
    wanted = {
        "GRUB_TIMEOUT": "1",
        "GRUB_CMDLINE_LINUX_DEFAULT": '""',
        "GRUB_CMDLINE_LINUX": f'"{KERNEL_CMDLINE}"',
        "GRUB_TERMINAL": '"serial console"',
        "GRUB_SERIAL_COMMAND": '"serial --unit=0 --speed=115200"',
    }
    lines = existing.splitlines()
    for name, value in wanted.items():
        setting = re.compile(rf"^#?\s*{name}=")
        found = [i for i, line in enumerate(lines) if setting.match(line)]
        if found:
            lines[found[0]] = f"{name}={value}"
        else:
            lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def interfaces_text() -> str:
    return (
        "source /etc/network/interfaces.d/*\n\n"
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet dhcp\n"
    )


def sources_list_text(mirror: str, security_mirror: str | None) -> str:
    text = f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n"
    if security_mirror:
        text += f"deb {security_mirror} {SECURITY_SUITE} main\n"
    return text


def metadata_text() -> str:
    meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}
    return json.dumps(meta) + "\n"


VAGRANTFILE = """\
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
"""

SSH_HOSTKEYS_UNIT = """\
[Unit]
Description=Generate this VM's own SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


# ---------------------------------------------------------------- host helpers


def vagrant_key_path(name: str = "vagrant.pub") -> Path:
    """A file of Vagrant's insecure key pair, as shipped by Debian's vagrant."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "vagrant"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HostError(
            f"cannot list the vagrant package ({exc}); install it with "
            "`apt-get install vagrant`."
        ) from exc
    for line in listing.splitlines():
        if line.endswith(f"/keys/{name}"):
            return Path(line)
    raise HostError(
        f"the vagrant package ships no keys/{name}; reinstall it with "
        "`apt-get install --reinstall vagrant`."
    )


def check_host() -> None:
    if os.geteuid() != 0:
        raise HostError("building the box needs root (debootstrap); run as root.")
    for tool, package in HOST_TOOLS.items():
        if shutil.which(tool) is None:
            raise HostError(
                f"{tool} is missing; install it with `apt-get install {package}`."
            )
    if not (GRUB_PC_DIR / "boot.img").is_file():
        raise HostError(
            f"{GRUB_PC_DIR}/boot.img is missing; install it with "
            "`apt-get install grub-pc-bin`."
        )


def _run(
    cmd: list[str],
    log_path: Path,
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    shell.run_logged(cmd, log_path, what="building the box", stdin=stdin, env=env)


def _chroot(
    root: Path, cmd: list[str], log_path: Path, stdin: str | None = None
) -> None:
    _run(["chroot", str(root), *cmd], log_path, stdin=stdin, env=CHROOT_ENV)


def _mounts_below(path: Path) -> list[Path]:
    prefix = f"{path.resolve()}/"
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        # /proc/mounts escapes spaces in mount points as \040.
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            mounts.append(Path(point))
    return mounts


def _remove_build_dir(path: Path) -> None:
    """Delete a build directory, first unmounting anything debootstrap left in it."""
    for point in sorted(_mounts_below(path), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "-l", str(point)], check=False)
    left = _mounts_below(path)
    if left:
        # Deleting through a mount (a bind-mounted /dev) would delete host files.
        raise HostError(
            f"{left[0]} is still mounted; unmount it, then delete {path} by hand."
        )
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- build steps


def _debootstrap(root: Path, mirror: str, log_path: Path) -> None:
    _run(
        [
            "debootstrap",
            f"--include={','.join(PACKAGES)}",
            "--components=main",
            SUITE,
            str(root),
            mirror,
        ],
        log_path,
    )


def _kernel_version(root: Path) -> str:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise HostError(
            f"debootstrap installed no kernel in {root}/boot; "
            "check the mirror carries linux-image-amd64."
        )
    return kernels[-1].name.removeprefix("vmlinuz-")


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise HostError(f"user {user} was not created in {root}.")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _add_vagrant_user(root: Path, public_key: str, log_path: Path) -> None:
    _chroot(
        root, ["useradd", "--create-home", "--shell", "/bin/bash", "vagrant"], log_path
    )
    # '*' rather than a locked '!': no password works, yet sshd accepts the key.
    _chroot(root, ["usermod", "--password", "*", "vagrant"], log_path)
    _write(root / "etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD:ALL\n", 0o440)
    uid, gid = _passwd_ids(root, "vagrant")
    ssh_dir = root / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    _write(ssh_dir / "authorized_keys", public_key.strip() + "\n", 0o600)
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, uid, gid)


def _configure_ssh(root: Path) -> None:
    _write(root / "etc/ssh/sshd_config.d/pvlab.conf", "UseDNS no\n")
    # Every VM made from the box generates its own host keys at first boot.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    unit = root / "etc/systemd/system/ssh-hostkeys.service"
    _write(unit, SSH_HOSTKEYS_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).unlink(missing_ok=True)
    (wants / unit.name).symlink_to(f"../{unit.name}")


def _install_grub_files(root: Path, fs_uuid: str, core_img: Path) -> None:
    grub_dir = root / "boot/grub"
    target = grub_dir / "i386-pc"
    target.mkdir(parents=True, exist_ok=True)
    for path in GRUB_PC_DIR.iterdir():
        if path.suffix in (".mod", ".lst", ".o") or path.name == "modinfo.sh":
            shutil.copy2(path, target / path.name)
    # grub-pc's postinst reinstalls GRUB on upgrades only where core.img exists.
    shutil.copy2(core_img, target / "core.img")
    shutil.copy2(GRUB_PC_DIR / "boot.img", target / "boot.img")
    _write(grub_dir / "grub.cfg", grub_cfg_text(_kernel_version(root), fs_uuid))
    default = root / "etc/default/grub"
    _write(default, default_grub_text(default.read_text()))


def _clean(root: Path, log_path: Path) -> None:
    _chroot(root, ["apt-get", "clean"], log_path)
    for pattern in ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/log/*.log"):
        for path in root.glob(pattern):
            path.unlink()
    # An empty machine-id makes systemd create a fresh one in each VM.
    _write(root / "etc/machine-id", "", 0o444)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # debootstrap copied the host's resolver; dhclient writes the VM's own.
    (root / "etc/resolv.conf").unlink(missing_ok=True)


def _rebuild_initramfs(root: Path, log_path: Path) -> None:
    # The fsck hook cannot probe the root device in a chroot; told the type, the
    # initramfs carries fsck.ext4 and checks the root filesystem at boot. Inside
    # the VM the probe works, so the hint goes again afterwards.
    hint = root / "etc/initramfs-tools/conf.d/pvlab-build-fstype"
    _write(hint, "FSTYPE=ext4\n")
    try:
        _chroot(root, ["update-initramfs", "-u", "-k", "all"], log_path)
    finally:
        hint.unlink()


def _configure(
    root: Path,
    key: str,
    mirror: str,
    security_mirror: str | None,
    public_key: str,
    core_img: Path,
    log_path: Path,
) -> None:
    fs_uuid = root_uuid(key)
    _write(root / "etc/hostname", f"{HOSTNAME}\n")
    _write(root / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    _write(root / "etc/fstab", fstab_text(fs_uuid))
    _rebuild_initramfs(root, log_path)
    _write(root / "etc/network/interfaces", interfaces_text())
    _write(root / "etc/apt/sources.list", sources_list_text(mirror, security_mirror))
    _chroot(
        root,
        ["debconf-set-selections"],
        log_path,
        stdin=f"grub-pc grub-pc/install_devices multiselect {VM_DISK}\n",
    )
    _add_vagrant_user(root, public_key, log_path)
    _configure_ssh(root)
    _install_grub_files(root, fs_uuid, core_img)
    _clean(root, log_path)


def _make_core_img(path: Path, log_path: Path) -> None:
    _run(
        [
            "grub-mkimage",
            "--format=i386-pc",
            f"--directory={GRUB_PC_DIR}",
            f"--prefix={GRUB_PREFIX}",
            f"--output={path}",
            *GRUB_CORE_MODULES,
        ],
        log_path,
    )
    if path.stat().st_size > PARTITION_START - 512:
        raise HostError(
            f"{path} does not fit before the first partition; "
            "drop modules from GRUB_CORE_MODULES."
        )


def _make_disk(root: Path, raw: Path, fs_uuid: str, log_path: Path) -> None:
    size = DISK_GIB << 30
    with raw.open("wb") as disk:
        disk.truncate(size)
    _run(
        ["sfdisk", "--quiet", str(raw)],
        log_path,
        stdin=f"label: dos\nstart={PARTITION_START // 512}, type=83, bootable\n",
    )
    blocks = (size - PARTITION_START) // BLOCK_SIZE
    # Zeroing inode tables now (on a sparse file, dropped again by qemu-img) spares
    # the emulated VM the kernel's lazy init writes after its first boot.
    options = f"offset={PARTITION_START},lazy_itable_init=0,nodiscard"
    _run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            str(BLOCK_SIZE),
            "-L",
            "root",
            "-U",
            fs_uuid,
            "-E",
            options,
            "-d",
            str(root),
            str(raw),
            str(blocks),
        ],
        log_path,
    )


def boot_sector(boot_img: bytes) -> bytes:
    """The MBR boot code: boot.img's first 440 bytes, set up for a hard disk."""
    code = bytearray(boot_img[:MBR_CODE_SIZE])
    code[BOOT_DRIVE_CHECK : BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(code)


def _write_boot_code(raw: Path, core_img: Path) -> None:
    # grub-mkimage already set diskboot's blocklist to core.img's length, starting
    # at sector 2, which matches core.img written from sector 1.
    with raw.open("r+b") as disk:
        disk.write(boot_sector((GRUB_PC_DIR / "boot.img").read_bytes()))
        disk.seek(512)
        disk.write(core_img.read_bytes())


def _convert(raw: Path, qcow2: Path, log_path: Path) -> None:
    _run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(qcow2)], log_path)
    raw.unlink()


def _pack(work: Path, qcow2: Path, box: Path) -> None:
    (work / "metadata.json").write_text(metadata_text())
    (work / "Vagrantfile").write_text(VAGRANTFILE)
    with tarfile.open(box, "w") as tar:
        tar.add(work / "metadata.json", arcname="metadata.json")
        tar.add(work / "Vagrantfile", arcname="Vagrantfile")
        tar.add(qcow2, arcname="box.img")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def box_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"debian12-{key}.box"


def _build(
    work: Path,
    box: Path,
    key: str,
    mirror: str,
    security_mirror: str | None,
    public_key: str,
    log_path: Path,
    progress: Progress,
) -> None:
    root, raw, qcow2 = work / "root", work / "disk.raw", work / "box.img"
    core_img = work / "core.img"
    progress(f"box: debootstrap {SUITE} from {mirror} (takes a few minutes)")
    _debootstrap(root, mirror, log_path)
    progress("box: configure the vagrant user, sshd, network, apt and GRUB files")
    _make_core_img(core_img, log_path)
    _configure(root, key, mirror, security_mirror, public_key, core_img, log_path)
    progress(f"box: disk: write a {DISK_GIB} GiB sparse disk with one ext4 partition")
    _make_disk(root, raw, root_uuid(key), log_path)
    progress("box: grub: write GRUB's boot code into the disk's first MiB")
    _write_boot_code(raw, core_img)
    progress("box: convert: compress the disk to qcow2")
    _convert(raw, qcow2, log_path)
    progress(f"box: tar: pack {box.name}")
    _pack(work, qcow2, work / "box.tmp")


def build_box(
    cache_dir: Path,
    mirror: str,
    *,
    security_mirror: str | None = None,
    progress: Progress = print,
) -> Path:
    """Return a cached .box for these inputs, building it first if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    public_key = vagrant_key_path().read_text()
    key = cache_key(mirror, security_mirror=security_mirror, ssh_public_key=public_key)
    box = box_file(cache_dir, key)
    if box.is_file():
        return box
    check_host()
    with _locked(cache_dir):
        if box.is_file():
            return box
        # Named after the box, so pruning superseded boxes keeps it.
        log_path = cache_dir / f"{box.name}.build.log"
        log_path.unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        started = time.monotonic()
        try:
            _build(
                work, box, key, mirror, security_mirror, public_key, log_path, progress
            )
            checksum = file_sha256(work / "box.tmp")
            Path(f"{box}.sha256").write_text(f"{checksum}  {box.name}\n")
            os.replace(work / "box.tmp", box)
        finally:
            _remove_build_dir(work)
    size_mib = box.stat().st_size / (1 << 20)
    progress(
        f"box: built {box} ({size_mib:.0f} MiB) in {time.monotonic() - started:.0f} s"
    )
    cache.prune_superseded(box, "debian12-*")
    return box


# ---------------------------------------------------------------- vagrant


def box_checksum(box: Path) -> str:
    """The box's sha256, from the file written beside it at build time."""
    sidecar = Path(f"{box}.sha256")
    if sidecar.is_file():
        return sidecar.read_text().split()[0]
    return file_sha256(box)


def vagrant_box_dir(name: str, provider: str = "libvirt") -> Path:
    """Where Vagrant unpacks an unversioned box (version 0) of this name."""
    home = Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))
    return home / "boxes" / name.replace("/", "-VAGRANTSLASH-") / "0" / provider


ADDED_MARKER = "pvlab-source.sha256"


def box_is_current(box: Path, name: str = BOX_NAME) -> bool:
    marker = vagrant_box_dir(name) / ADDED_MARKER
    return marker.is_file() and marker.read_text().strip() == box_checksum(box)


def add_box(
    box_path: Path, name: str = BOX_NAME, *, progress: Progress = print
) -> bool:
    """Add the box to Vagrant unless this very file is already added; True if added."""
    if not box_path.is_file():
        raise SettingsError(f"box file {box_path} does not exist; build it first.")
    if box_is_current(box_path, name):
        return False
    progress(f"box: vagrant box add {name}")
    cmd = [
        "vagrant",
        "box",
        "add",
        "--force",
        "--name",
        name,
        "--provider",
        "libvirt",
        str(box_path),
    ]
    log.debug("running %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise HostError(
            f"`vagrant box add` of {box_path} failed ({' '.join(detail)}); "
            "check vagrant-libvirt is installed."
        )
    box_dir = vagrant_box_dir(name)
    if box_dir.is_dir():
        (box_dir / ADDED_MARKER).write_text(box_checksum(box_path) + "\n")
    return True
