"""Build the bundled sample PV boot volume: Debian's PV-capable kernel and a busybox
initramfs that prints its EC2 user-data, laid out the way UniK lays out AWS images."""

import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pvlab import cache
from pvlab.errors import HostError, ImageError, SettingsError

log = logging.getLogger(__name__)

# The guest prints its user-data between these lines; tests and `invoke demo`
# look for them on the console.
BEGIN_MARKER = "===== pvlab user-data begin ====="
END_MARKER = "===== pvlab user-data end ====="
PROGRESS_PREFIX = "pvlab-sample:"
# Kernel command line options the guest's /init reads: keep running instead of
# powering off, and where the IMDS listens (HOST[:PORT], 169.254.169.254:80).
HOLD_OPTION = "pvlab.hold=1"
IMDS_OPTION = "pvlab.imds"

# hd0: one bare ext2 filesystem, attached as /dev/sda1, read by PV-GRUB as (hd0).
# hd00: an MBR with one partition, attached as /dev/sda, read as (hd0,0).
LAYOUTS = ("hd0", "hd00")
DEFAULT_SIZE_MIB = 64
KERNEL_COMMAND_LINE = "console=hvc0 quiet"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
PARTITION_OFFSET = 2 * 1024 * 1024
MENU_TITLE = "pvlab sample"

# Raise when the build steps change what lands in the image, so that images
# cached by an older pvlab are not reused.
_BUILD_FORMAT = 1

# Drivers the initramfs carries, in load order. The Xen frontend is the one
# EC2 needs; virtio and e1000 let the same initramfs boot under plain QEMU.
_NETWORK_DRIVERS = (
    ("CONFIG_XEN_NETDEV_FRONTEND", "xen_netfront", True),
    ("CONFIG_VIRTIO_PCI", "virtio_pci", False),
    ("CONFIG_VIRTIO_NET", "virtio_net", False),
    ("CONFIG_E1000", "e1000", False),
)
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class DebianPackage:
    """One binary package at the version apt would install."""

    name: str
    version: str

    @property
    def file_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}.deb"


@dataclass(frozen=True)
class SamplePackages:
    """The Debian packages a sample image is built from."""

    kernel: DebianPackage
    busybox: DebianPackage

    @property
    def kernel_release(self) -> str:
        """What `uname -r` prints in the guest, e.g. 6.1.0-57-amd64."""
        return self.kernel.name.removeprefix("linux-image-")


def resolve_packages() -> SamplePackages:
    """Ask apt which kernel linux-image-amd64 currently means, and which busybox."""
    stanzas = _apt_show(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
    kernel = None
    for dependency in stanzas[KERNEL_META_PACKAGE].get("Depends", "").split(","):
        # e.g. "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
        name, _, constraint = dependency.strip().partition(" ")
        suffix = name.removeprefix("linux-image-")
        if suffix != name and suffix[:1].isdigit():
            version = constraint.strip("()").removeprefix("=").strip()
            if not constraint.startswith("(="):
                version = _apt_show(name)[name]["Version"]
            kernel = DebianPackage(name, version)
            break
    if kernel is None:
        raise HostError(
            f"apt's {KERNEL_META_PACKAGE} names no versioned kernel package; "
            "check the host's apt sources and run apt-get update."
        )
    busybox = DebianPackage(BUSYBOX_PACKAGE, stanzas[BUSYBOX_PACKAGE]["Version"])
    return SamplePackages(kernel, busybox)


def kernel_version() -> str:
    """The kernel release the sample image boots, e.g. 6.1.0-57-amd64."""
    return resolve_packages().kernel_release


def menu_lst(layout: str, command_line: str = KERNEL_COMMAND_LINE) -> str:
    """The GRUB legacy menu.lst (also written as grub.conf) for a layout."""
    root = "(hd0)" if _checked_layout(layout) == "hd0" else "(hd0,0)"
    # fallback=1 names an entry that does not exist; UniK writes it so, and
    # PV-GRUB must cope with it.
    return (
        "default=0\n"
        "fallback=1\n"
        "timeout=1\n"
        "hiddenmenu\n"
        "\n"
        f"title {MENU_TITLE}\n"
        f"root {root}\n"
        f"kernel /boot/program.bin {command_line}\n"
        "initrd /boot/initrd.img\n"
    )


def device_map(layout: str) -> str:
    """The GRUB device.map: the disk EC2 attaches the volume as."""
    disk = "/dev/sda1" if _checked_layout(layout) == "hd0" else "/dev/sda"
    return f"(hd0) {disk}\n"


def init_script() -> str:
    """The initramfs /init, with the console marker lines filled in."""
    text = _data_text("sample-init.sh")
    for placeholder, value in (
        ("@BEGIN_MARKER@", BEGIN_MARKER),
        ("@END_MARKER@", END_MARKER),
        ("@PROGRESS_PREFIX@", PROGRESS_PREFIX),
        ("@HOLD_OPTION@", HOLD_OPTION),
        ("@IMDS_OPTION@", IMDS_OPTION),
    ):
        text = text.replace(placeholder, value)
    return text


def udhcpc_script() -> str:
    """The udhcpc event script the initramfs installs as /etc/udhcpc.script."""
    return _data_text("sample-udhcpc.sh")


def sample_image_path(
    cache_dir: Path,
    packages: SamplePackages,
    *,
    layout: str = "hd0",
    size_mib: int = DEFAULT_SIZE_MIB,
) -> Path:
    """Where the image built from these inputs is cached, built or not."""
    inputs = {
        "format": _BUILD_FORMAT,
        "kernel": [packages.kernel.name, packages.kernel.version],
        "busybox": packages.busybox.version,
        "init": init_script(),
        "udhcpc": udhcpc_script(),
        "menu.lst": menu_lst(layout),
        "device.map": device_map(layout),
        "layout": layout,
        "size_mib": size_mib,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"pvlab-sample-{layout}-{digest[:16]}.img"


def build_sample_image(
    cache_dir: Path, *, layout: str = "hd0", size_mib: int = DEFAULT_SIZE_MIB
) -> Path:
    """Build (or reuse from cache_dir) a sample AWS-style PV boot volume.

    The kernel and busybox are the versions the host's apt currently offers;
    their .deb files are kept in cache_dir/debs.
    """
    _checked_layout(layout)
    if not isinstance(size_mib, int) or size_mib < 16:
        raise SettingsError(
            f"sample image size {size_mib!r} MiB is too small; use at least 16."
        )
    _require_tools("apt-get", "apt-cache", "dpkg-deb", "mke2fs")
    if layout == "hd00":
        _require_tools("sfdisk")

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = resolve_packages()
    image = sample_image_path(cache_dir, packages, layout=layout, size_mib=size_mib)
    if image.exists():
        log.info("using cached sample image %s", image)
        return image

    log.info(
        "building sample image (%s) from %s %s and busybox %s",
        layout,
        packages.kernel.name,
        packages.kernel.version,
        packages.busybox.version,
    )
    debs = cache_dir / "debs"
    kernel_deb = _download(packages.kernel, debs)
    busybox_deb = _download(packages.busybox, debs)

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        _extract(kernel_deb, work / "kernel")
        _extract(busybox_deb, work / "busybox")
        release = packages.kernel_release
        kernel = work / "kernel"
        vmlinuz = _unpacked(kernel, f"boot/vmlinuz-{release}", kernel_deb)
        config = _unpacked(kernel, f"boot/config-{release}", kernel_deb)
        modules_dir = _unpacked(kernel, f"lib/modules/{release}", kernel_deb)
        modules = _network_modules(_kernel_config(config), modules_dir, release)
        log.info(
            "building the sample initramfs with %s",
            ", ".join(name for name, _ in modules),
        )
        busybox = _unpacked(work / "busybox", "bin/busybox", busybox_deb)
        initramfs = _initramfs(busybox, modules)

        staging = work / "staging"
        grub = staging / "boot" / "grub"
        grub.mkdir(parents=True)
        shutil.copyfile(vmlinuz, staging / "boot" / "program.bin")
        (staging / "boot" / "initrd.img").write_bytes(initramfs)
        (grub / "menu.lst").write_text(menu_lst(layout))
        (grub / "grub.conf").write_text(menu_lst(layout))
        (grub / "device.map").write_text(device_map(layout))

        log.info("writing the %s boot volume (%d MiB ext2)", layout, size_mib)
        partial = work / image.name
        _make_volume(partial, staging, layout, size_mib)
        os.replace(partial, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("sample image ready: %s", image)
    cache.prune_superseded(image, f"pvlab-sample-{layout}-*.img")
    return image


def _checked_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise SettingsError(
            f"unknown boot volume layout {layout!r}; use one of {', '.join(LAYOUTS)}."
        )
    return layout


def _data_text(name: str) -> str:
    return resources.files("pvlab").joinpath("data", name).read_text()


def _require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise HostError(
            f"the host lacks {', '.join(missing)}, needed to build the sample "
            "image; install apt, dpkg, e2fsprogs and fdisk."
        )


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.debug("running %s", " ".join(command))
    return subprocess.run(
        command, check=False, capture_output=True, text=True, **kwargs
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """The candidate version's control fields of each package, by package name."""
    result = _run(["apt-cache", "show", "--no-all-versions", *packages])
    stanzas: dict[str, dict[str, str]] = {}
    for block in result.stdout.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and line[:1] not in ("", " ", "\t"):
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    missing = [package for package in packages if package not in stanzas]
    if missing:
        raise HostError(
            f"apt-cache knows no package {', '.join(missing)}; add a Debian 12 "
            "source to the host's apt sources and run apt-get update."
        )
    return stanzas


def _download(package: DebianPackage, debs: Path) -> Path:
    """Fetch one .deb with apt-get download into the cache, once."""
    target = debs / package.file_name
    if target.is_file():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s %s with apt-get", package.name, package.version)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=debs))
    try:
        # apt drops privileges to _apt for downloads; a private scratch
        # directory is not readable by it, so ask apt to stay as the caller.
        result = _run(
            [
                "apt-get",
                "-o",
                f"APT::Sandbox::User={_user_name()}",
                "download",
                f"{package.name}={package.version}",
            ],
            cwd=scratch,
        )
        downloaded = sorted(scratch.glob("*.deb"))
        if result.returncode != 0 or len(downloaded) != 1:
            raise HostError(
                f"apt-get could not download {package.name} {package.version} "
                f"({_last_line(result.stderr)}); check the host's network and "
                "apt sources, then run apt-get update."
            )
        _check_deb(downloaded[0], package)
        os.replace(downloaded[0], target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _check_deb(deb: Path, package: DebianPackage) -> None:
    result = _run(["dpkg-deb", "--field", str(deb), "Package", "Version"])
    fields = dict(
        line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line
    )
    if (fields.get("Package"), fields.get("Version")) != (
        package.name,
        package.version,
    ):
        raise HostError(
            f"apt-get download of {package.name} {package.version} produced "
            f"{deb.name}; check the host's apt sources."
        )


def _extract(deb: Path, destination: Path) -> None:
    result = _run(["dpkg-deb", "-x", str(deb), str(destination)])
    if result.returncode != 0:
        raise HostError(
            f"dpkg-deb could not unpack {deb} ({_last_line(result.stderr)}); "
            "delete it from the cache and build again."
        )


def _unpacked(root: Path, path: str, deb: Path) -> Path:
    """A file of an unpacked package, wherever a merged /usr put it."""
    for candidate in (root / path, root / "usr" / path):
        if candidate.exists():
            return candidate
    raise HostError(
        f"{deb.name} holds no {path}; delete it from the cache and build again."
    )


def _kernel_config(path: Path) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key] = value
    return config


def _network_modules(
    config: dict[str, str], modules_dir: Path, release: str
) -> list[tuple[str, bytes]]:
    """The driver modules /init loads, dependencies first, as (name, .ko bytes).

    The kernel package ships no modules.dep (depmod writes it on install), so
    dependencies come from each module's own .modinfo "depends=" field.
    """
    index = _module_index(modules_dir)
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ImageError(f"kernel modules depend on each other in a loop: {name}.")
        if name not in index:
            raise ImageError(
                f"kernel {release} has no module {name} that a driver needs; "
                "choose another kernel package."
            )
        data = _module_bytes(index[name])
        for dependency in _module_depends(data, index[name]):
            add(dependency, chain + (name,))
        seen.add(name)
        ordered.append((name, data))

    for symbol, module, required in _NETWORK_DRIVERS:
        setting = config.get(symbol)
        if setting == "m":
            add(module, ())
        elif setting != "y" and required:
            raise ImageError(
                f"kernel {release} lacks {symbol}, so it has no network under "
                "Xen PV; choose a kernel package built with it."
            )
    return ordered


def _module_index(modules_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko*"):
        for suffix in _MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index[path.name.removesuffix(suffix).replace("-", "_")] = path
                break
    return index


def _module_bytes(path: Path) -> bytes:
    """The module uncompressed, so busybox insmod need not know the compression."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        _require_tools("zstd")
        result = subprocess.run(
            ["zstd", "-dc", str(path)], check=False, capture_output=True
        )
        if result.returncode != 0:
            raise HostError(f"zstd could not decompress {path.name}.")
        return result.stdout
    return data


def _module_depends(data: bytes, path: Path) -> list[str]:
    try:
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as error:
        raise ImageError(f"{path.name} is not a kernel module ({error}).") from error
    if section is None:
        return []
    for entry in section.data().split(b"\0"):
        if entry.startswith(b"depends="):
            names = entry.removeprefix(b"depends=").decode()
            return [name.replace("-", "_") for name in names.split(",") if name]
    return []


class _NewcArchive:
    """A cpio archive in the "newc" format the kernel unpacks as initramfs.

    Written here rather than by cpio(1) so that ownership and times are fixed
    (root, epoch) and /dev/console can exist without mknod on the host.
    """

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._inode = 0

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, inode=0)
        return self._buffer.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        if inode is None:
            self._inode += 1
            inode = self._inode
        encoded = name.encode() + b"\0"
        links = 2 if stat.S_ISDIR(mode) else 1
        fields = (inode, mode, 0, 0, links, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._buffer.write(chunk)
        self._buffer.write(b"\0" * (-len(chunk) % 4))


def _initramfs(busybox: Path, modules: list[tuple[str, bytes]]) -> bytes:
    archive = _NewcArchive()
    for directory in (
        "bin",
        "dev",
        "etc",
        "etc/pvlab",
        "lib",
        "lib/modules",
        "proc",
        "run",
        "sys",
        "tmp",
    ):
        archive.directory(directory)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.file("init", init_script().encode(), 0o755)
    archive.file("etc/udhcpc.script", udhcpc_script().encode(), 0o755)
    archive.file(
        "etc/pvlab/modules", "".join(f"{name}\n" for name, _ in modules).encode()
    )
    for name, data in modules:
        archive.file(f"lib/modules/{name}.ko", data)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


def _make_volume(image: Path, staging: Path, layout: str, size_mib: int) -> None:
    """Write the ext2 boot volume without mounting anything (no loop devices)."""
    size = size_mib * 1024 * 1024
    with image.open("wb") as handle:
        handle.truncate(size)
    # 128-byte inodes, as UniK makes them: GRUB legacy reads no larger ones.
    mke2fs = ["mke2fs", "-q", "-F", "-t", "ext2", "-I", "128", "-L", "boot"]
    if layout == "hd0":
        command = [*mke2fs, "-d", str(staging), str(image)]
    else:
        table = f"label: dos\nunit: sectors\n\nstart={PARTITION_OFFSET // 512}, "
        table += "type=83, bootable\n"
        result = _run(["sfdisk", "--quiet", str(image)], input=table)
        if result.returncode != 0:
            raise ImageError(
                f"sfdisk could not partition {image.name} "
                f"({_last_line(result.stderr)}); use a larger size."
            )
        filesystem_kib = (size - PARTITION_OFFSET) // 1024
        command = [
            *mke2fs,
            "-E",
            f"offset={PARTITION_OFFSET}",
            "-d",
            str(staging),
            str(image),
            f"{filesystem_kib}k",
        ]
    result = _run(command)
    if result.returncode != 0:
        raise ImageError(
            f"mke2fs could not build a {size_mib} MiB sample volume "
            f"({_last_line(result.stderr)}); use a larger size."
        )
