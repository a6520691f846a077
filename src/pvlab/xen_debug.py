"""Build, on the host, the Xen hypervisor with gdbsx support and the gdbsx tool.

Debian builds Xen without CONFIG_GDBSX and ships no gdbsx, so pvlab rebuilds both
from Debian's source of the very Xen version dom0 runs, at native speed on the host.
"""

from __future__ import annotations

import datetime
import fcntl
import gzip
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from pvlab import cache, shell
from pvlab.box import (
    SECURITY_SUITE,
    SUITE,
    Progress,
    mirror_from_host,
    security_mirror_from_host,
)
from pvlab.errors import HostError, SettingsError

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "xen"
# Raise whenever a build step changes what lands in the artefacts: it is part of
# the cache key, so a changed recipe never hands out artefacts of an older one.
RECIPE_VERSION = 1
# Appended to Xen's extra version, so `xl info` shows it (xen_extra ".5-gdbsx")
# and the boot file is xen-4.17.5-gdbsx.gz.
VENDOR_VERSION = "-gdbsx"
# Applied on top of Debian's own hypervisor config (debian/xen-kconfig).
KCONFIG_FRAGMENT = """\
CONFIG_EXPERT=y
CONFIG_GDBSX=y
# Lets a guest's HYPERVISOR_console_io output reach `xl dmesg`, which shows a
# unikernel that dies before its console ring is up.
CONFIG_VERBOSE_DEBUG=y
# EXPERT would switch UNSUPPORTED on by default, and with it tboot; keep
# Debian's feature set otherwise.
# CONFIG_UNSUPPORTED is not set
"""
# What the build runs beyond a bare Debian: dpkg-source, the hypervisor's
# Kconfig (flex, bison) and helper scripts (python3), and the distribution
# name Debian's banner patch asks lsb_release for.
BUILD_PACKAGES = (
    "build-essential",
    "dpkg-dev",
    "xz-utils",
    "patch",
    "flex",
    "bison",
    "python3",
    "lsb-release",
)
GDBSX_PATCH = "gdbsx-listen-loopback.patch"
GDBSX_DIR = "tools/debugger/gdbsx"
GDBSX_SOURCES = (
    "gx/gx_comm.c",
    "gx/gx_main.c",
    "gx/gx_utils.c",
    "gx/gx_local.c",
    "xg/xg_main.c",
)
GDBSX_CFLAGS = (
    "-std=gnu99",
    "-O2",
    "-g",
    "-Wall",
    "-Wno-unused-but-set-variable",
    "-fno-strict-aliasing",
    "-D_GNU_SOURCE",
    "-D__XEN_TOOLS__",
)
# A function the hypervisor has only when built with CONFIG_GDBSX.
GDBSX_HYPERVISOR_SYMBOL = "gdbsx_guest_mem_io"
# Who built it, as the hypervisor's boot banner and `xl info` (cc_compile_by)
# show it; Debian's banner patch reads it from this variable.
BUILDER = "pvlab <pvlab@localhost>"
METADATA = "build.json"
ARCH = "x86_64"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# A Debian version of Xen: optional epoch, upstream x.y[.z...], Debian revision.
_VERSION_RE = re.compile(r"^(?:\d+:)?\d+\.\d+[0-9A-Za-z.+~-]*-[0-9A-Za-z.+~]+$")


@dataclass(frozen=True)
class DebugXen:
    """A cached gdbsx-enabled hypervisor and gdbsx tool for one Xen version."""

    version: str
    directory: Path
    hypervisor: Path
    gdbsx: Path
    xen_syms: Path
    config: Path
    full_version: str
    xen_extra: str
    build_id: str
    gdbsx_static: bool
    build_seconds: float

    @property
    def boot_path(self) -> str:
        """Where dom0 keeps the hypervisor, beside Debian's /boot/xen-4.17-amd64.gz."""
        return f"/boot/{self.hypervisor.name}"

    def role_vars(self) -> dict[str, str]:
        """The variables the xen_debug Ansible role needs."""
        return {
            "xen_debug_hypervisor_src": str(self.hypervisor),
            "xen_debug_gdbsx_src": str(self.gdbsx),
            "xen_debug_xen_extra": self.xen_extra,
            "xen_debug_build_id": self.build_id,
        }


# ---------------------------------------------------------------- names and keys


def check_version(xen_version: str) -> str:
    """The Debian version of Xen, refused early if it cannot be one."""
    if not isinstance(xen_version, str) or not _VERSION_RE.match(xen_version):
        raise SettingsError(
            f"{xen_version!r} is not a Debian version of Xen; pass the full "
            "package version dom0 runs, e.g. from `dpkg-query -W xen-utils-common`."
        )
    return xen_version


def gdbsx_patch_text() -> str:
    return resources.files("pvlab").joinpath("data", GDBSX_PATCH).read_text()


def build_key(xen_version: str, *, patch_text: str | None = None) -> str:
    """A short hash of everything that decides the artefacts of this version."""
    inputs = {
        "recipe": RECIPE_VERSION,
        "package": SOURCE_PACKAGE,
        "version": check_version(xen_version),
        "arch": ARCH,
        "vendor_version": VENDOR_VERSION,
        "kconfig": KCONFIG_FRAGMENT,
        "gdbsx_patch": gdbsx_patch_text() if patch_text is None else patch_text,
        "gdbsx_sources": list(GDBSX_SOURCES),
        "gdbsx_cflags": list(GDBSX_CFLAGS),
        "builder": BUILDER,
    }
    text = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without_epoch(version: str) -> str:
    return version.split(":", 1)[-1]


def artefact_dir(cache_dir: Path, xen_version: str) -> Path:
    """Where the build of this version with the current recipe is (or will be)."""
    key = build_key(xen_version)
    return Path(cache_dir) / f"xen-{_without_epoch(xen_version)}-gdbsx-{key}"


def dsc_name(xen_version: str) -> str:
    return f"{SOURCE_PACKAGE}_{_without_epoch(xen_version)}.dsc"


def deb_src_lines(
    mirror: str, security_mirror: str | None, *, keyring: Path | None = None
) -> str:
    """deb-src lines for the Debian suites the host installs from."""
    options = f"[signed-by={keyring}] " if keyring else ""
    mirror = mirror.rstrip("/")
    lines = [
        f"deb-src {options}{mirror} {SUITE} main",
        f"deb-src {options}{mirror} {SUITE}-updates main",
    ]
    if security_mirror:
        lines.append(
            f"deb-src {options}{security_mirror.rstrip('/')} {SECURITY_SUITE} main"
        )
    return "\n".join(lines) + "\n"


def kconfig_text(debian_config: str | None) -> str:
    """The starting .config: Debian's hypervisor config plus the gdbsx fragment."""
    base = debian_config or ""
    if base and not base.endswith("\n"):
        base += "\n"
    return base + KCONFIG_FRAGMENT


def kconfig_settings(text: str) -> dict[str, str]:
    """CONFIG_X -> value of a Kconfig file; "n" for `# CONFIG_X is not set`."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        unset = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if unset:
            settings[unset.group(1)] = "n"
            continue
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            settings[key] = value
    return settings


def xen_extra(full_version: str) -> str:
    """What `xl info` prints as xen_extra for a XEN_FULLVERSION: 4.17.5-gdbsx."""
    match = re.match(r"^\d+\.\d+(.*)$", full_version)
    if match is None:
        raise HostError(f"the Xen build reported version {full_version!r}.")
    return match.group(1)


def build_env(
    base: Mapping[str, str], *, xen_version: str, source_date_epoch: int
) -> dict[str, str]:
    """The environment of the hypervisor build, as Debian's rules set it up."""
    # dpkg's hardening flags suit dom0 binaries, not the hypervisor; Debian's
    # rules drop them too.
    dropped = {"CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "FFLAGS", "MAKEFLAGS"}
    env = {key: value for key, value in base.items() if key not in dropped}
    stamp = datetime.datetime.fromtimestamp(source_date_epoch, datetime.UTC)
    env.update(
        {
            "LC_ALL": "C",
            "SOURCE_DATE_EPOCH": str(source_date_epoch),
            "XEN_BUILD_DATE": stamp.strftime("%a %b %e %H:%M:%S UTC %Y"),
            "XEN_BUILD_TIME": stamp.strftime("%H:%M:%S"),
            "DEB_VERSION": xen_version,
            "DEB_MAINTAINER": BUILDER,
            # The hypervisor build must not download anything.
            "WGET": "/bin/false",
            "GIT": "/bin/false",
        }
    )
    return env


def make_args(tree: Path) -> list[str]:
    return [
        f"XEN_TARGET_ARCH={ARCH}",
        f"XEN_COMPILE_ARCH={ARCH}",
        f"XEN_VENDORVERSION={VENDOR_VERSION}",
        # Keeps the temporary build path out of the binaries and debug info.
        f"EXTRA_CFLAGS_XEN_CORE=-ffile-prefix-map={tree}=. -fdebug-prefix-map={tree}=.",
    ]


# ---------------------------------------------------------------- host helpers


_run = shell.run_logged


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".xen-debug.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def missing_packages(packages: Sequence[str] = BUILD_PACKAGES) -> list[str]:
    """The packages of this list that dpkg does not have installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
        check=False,
        capture_output=True,
        text=True,
    )
    installed = set()
    for line in result.stdout.splitlines():
        name, _, status = line.partition(" ")
        if status.strip() == "installed":
            installed.add(name.split(":", 1)[0])
    return [package for package in packages if package not in installed]


def ensure_build_deps(progress: Progress = print) -> None:
    """Install what the build needs, once; a no-op when all of it is there."""
    missing = missing_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise HostError(
            f"building Xen needs {', '.join(missing)}; install them with "
            f"`sudo {' '.join(command)}`."
        )
    progress(f"xen-debug: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise HostError(
            f"apt-get could not install {', '.join(missing)} ({' '.join(detail)}); "
            "check the host's apt sources."
        )


# ---------------------------------------------------------------- source


class SourceApt:
    """apt with its own deb-src list and state, leaving the host's /etc/apt alone."""

    def __init__(self, root: Path, mirror: str, security_mirror: str | None) -> None:
        self.root = root
        keyring = DEBIAN_KEYRING if DEBIAN_KEYRING.is_file() else None
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(
            deb_src_lines(mirror, security_mirror, keyring=keyring)
        )

    @property
    def options(self) -> list[str]:
        # apt drops privileges to _apt for downloads, which cannot write into a
        # private cache directory; the caller's own user can.
        user = pwd.getpwuid(os.geteuid()).pw_name
        settings = {
            "Dir::Etc::SourceList": self.root / "sources.list",
            "Dir::Etc::SourceParts": self.root / "sources.list.d",
            "Dir::State::Lists": self.root / "lists",
            "Dir::Cache": self.root / "cache",
            "APT::Sandbox::User": user,
            "Acquire::Languages": "none",
        }
        return [
            arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")
        ]

    def update(self, log_path: Path) -> None:
        _run(
            ["apt-get", *self.options, "update"],
            log_path,
            what="apt-get update of the Debian source lists",
        )

    def versions(self) -> list[str]:
        """The versions of the Xen source package these lists offer."""
        result = subprocess.run(
            ["apt-cache", *self.options, "showsrc", SOURCE_PACKAGE],
            check=False,
            capture_output=True,
            text=True,
        )
        found = re.findall(r"^Version: (\S+)$", result.stdout, flags=re.MULTILINE)
        return sorted(set(found))

    def download(self, xen_version: str, destination: Path, log_path: Path) -> None:
        command = [
            "apt-get",
            *self.options,
            "source",
            "--download-only",
            f"{SOURCE_PACKAGE}={xen_version}",
        ]
        log.debug("running %s", " ".join(command))
        with log_path.open("a") as out:
            out.write(f"$ {' '.join(command)}\n")
        result = subprocess.run(
            command, check=False, cwd=destination, capture_output=True, text=True
        )
        with log_path.open("a") as out:
            out.write(result.stdout + result.stderr)
        if result.returncode == 0:
            return
        known = ", ".join(self.versions()) or "none"
        if "Can not find version" in result.stderr or "Unable to find" in result.stderr:
            raise HostError(
                f"the host's Debian mirrors offer no source of xen {xen_version} "
                f"(they offer: {known}); install one of those in dom0 and build it."
            )
        others = ", ".join(v for v in self.versions() if v != xen_version) or "none"
        raise HostError(
            f"apt-get could not download the source of xen {xen_version} "
            f"({_last_error(result.stderr)}); the mirror may not serve that suite's "
            f"sources: pin dom0's Xen to another version ({others}) and build that."
        )


def _last_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("E:")]
    return (errors or stderr.strip().splitlines() or ["no message"])[0]


def _dsc_files(dsc: Path) -> list[str]:
    """The file names a .dsc lists under Files/Checksums-Sha256."""
    names: list[str] = []
    section = None
    for line in dsc.read_text(errors="replace").splitlines():
        if line and not line[0].isspace():
            section = line.split(":", 1)[0]
        elif section == "Checksums-Sha256" and line.strip():
            names.append(line.split()[-1])
    return names


def suite_version(suite: str = SUITE, package: str = "xen-utils-common") -> str:
    """The version of a Xen package in one suite of the host's apt sources.

    debootstrap installs from the release suite only; dom0 later upgrades from
    the security suite if its sources name it.
    """
    result = subprocess.run(
        ["apt-cache", "madison", package], check=False, capture_output=True, text=True
    )
    for line in result.stdout.splitlines():
        fields = [field.strip() for field in line.split("|")]
        origin = fields[2].split() if len(fields) == 3 else []
        # e.g. "http://mirror/debian bookworm/main amd64 Packages"
        if len(origin) > 1 and origin[1].split("/")[0] == suite:
            return fields[1]
    raise HostError(
        f"the host's apt knows no {package} in {suite}; add that suite to its "
        "sources and run apt-get update."
    )


def fetch_source(
    cache_dir: Path,
    xen_version: str,
    *,
    mirror: str | None = None,
    security_mirror: str | None = None,
    log_path: Path,
    progress: Progress = print,
) -> Path:
    """The .dsc of this Xen version in cache_dir/xen-source, downloaded once."""
    sources = Path(cache_dir) / "xen-source"
    dsc = sources / dsc_name(xen_version)
    if dsc.is_file() and all((sources / name).is_file() for name in _dsc_files(dsc)):
        return dsc
    if mirror is None:
        mirror = mirror_from_host()
        security_mirror = security_mirror or security_mirror_from_host()
    progress(f"xen-debug: download the Debian source of xen {xen_version}")
    apt = SourceApt(Path(cache_dir) / "apt-src", mirror, security_mirror)
    apt.update(log_path)
    sources.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=sources))
    try:
        apt.download(xen_version, scratch, log_path)
        # The .dsc moves last, so a present .dsc means all of its files are there.
        downloaded = sorted(scratch.iterdir(), key=lambda path: path.suffix == ".dsc")
        for path in downloaded:
            os.replace(path, sources / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not dsc.is_file():
        raise HostError(
            f"apt-get source left no {dsc.name} in {sources}; delete that "
            "directory and build again."
        )
    return dsc


# ---------------------------------------------------------------- build steps


def _unpack(dsc: Path, tree: Path, log_path: Path) -> None:
    # dpkg-source applies Debian's patch series; apt checked the files' hashes
    # against the signed Sources index when it downloaded them.
    _run(
        ["dpkg-source", "--no-copy", "-x", str(dsc), str(tree)],
        log_path,
        what=f"unpacking {dsc.name}",
    )


def _source_date_epoch(tree: Path) -> int:
    result = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(tree / "debian/changelog"), "-STimestamp"],
        check=False,
        capture_output=True,
        text=True,
    )
    try:
        return int(result.stdout.strip())
    except ValueError:
        return 0


def _configure_hypervisor(
    tree: Path, env: Mapping[str, str], log_path: Path
) -> dict[str, str]:
    debian_config = tree / "debian/xen-kconfig"
    config = tree / "xen/.config"
    if debian_config.is_file():
        config.write_text(kconfig_text(debian_config.read_text()))
    else:
        # Limitation: without Debian's config the build starts from upstream's
        # defaults, which may enable more than Debian's hypervisor has.
        log.warning("no debian/xen-kconfig in the source; starting from defconfig")
        config.write_text(kconfig_text(None))
    _run(
        ["make", "-C", "xen", "olddefconfig", *make_args(tree)],
        log_path,
        cwd=tree,
        env=env,
        what="configuring the hypervisor",
    )
    settings = kconfig_settings(config.read_text())
    for name, wanted in kconfig_settings(KCONFIG_FRAGMENT).items():
        if settings.get(name, "n") != wanted:
            raise HostError(
                f"Xen's Kconfig turned {name}={wanted} into "
                f"{settings.get(name, 'n')}; this Xen version cannot build gdbsx "
                "support as pvlab asks for it."
            )
    return settings


def _make_hypervisor(
    tree: Path, env: Mapping[str, str], log_path: Path, jobs: int
) -> str:
    _run(
        ["make", "-C", "xen", f"-j{jobs}", "build", *make_args(tree)],
        log_path,
        cwd=tree,
        env=env,
        what="building the hypervisor",
    )
    result = subprocess.run(
        ["make", "-s", "-C", "xen", "xenversion", *make_args(tree)],
        check=False,
        cwd=tree,
        env=dict(env),
        capture_output=True,
        text=True,
    )
    full_version = result.stdout.strip().splitlines()[-1:] or [""]
    return full_version[0]


def elf_build_id(path: Path) -> str:
    """The GNU build-id of an ELF file as hex, or "" if it has none."""
    with path.open("rb") as stream:
        for section in ELFFile(stream).iter_sections():
            if not isinstance(section, NoteSection):
                continue
            for note in section.iter_notes():
                # Other owners reuse type 3 (Xen's VIRT_BASE, for one).
                if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return ""


def elf_has_symbol(path: Path, name: str) -> bool:
    with path.open("rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            return False
        return bool(symtab.get_symbol_by_name(name))


def elf_is_static(path: Path) -> bool:
    """True when the executable needs no dynamic loader (no PT_INTERP)."""
    with path.open("rb") as stream:
        return not any(
            segment["p_type"] == "PT_INTERP"
            for segment in ELFFile(stream).iter_segments()
        )


def _check_hypervisor(tree: Path) -> None:
    xen_gz, xen_syms = tree / "xen/xen.gz", tree / "xen/xen-syms"
    if not (xen_gz.is_file() and xen_syms.is_file()):
        raise HostError(
            f"the hypervisor build produced no xen.gz or xen-syms in {tree / 'xen'}."
        )
    with gzip.open(xen_gz) as stream:
        if stream.read(4) != b"\x7fELF":
            raise HostError(f"{xen_gz} does not hold an ELF image GRUB could load.")
    if not elf_has_symbol(xen_syms, GDBSX_HYPERVISOR_SYMBOL):
        raise HostError(
            f"the rebuilt hypervisor lacks {GDBSX_HYPERVISOR_SYMBOL}, so "
            "CONFIG_GDBSX did not take effect; check xen/.config in the build log."
        )


def public_headers(tree: Path, include: Path, log_path: Path) -> None:
    """Lay out Xen's public headers as gdbsx includes them: <xen/...>."""
    xen = include / "xen"
    shutil.copytree(tree / "xen/include/public", xen)
    shutil.copytree(tree / "tools/include/xen-sys/Linux", xen / "sys")
    foreign = xen / "foreign"
    foreign.mkdir()
    public = tree / "xen/include/public"
    for arch in ("x86_32", "x86_64"):
        # mkheader.py names the include guard after its output path: keep it
        # relative so the guard stays a valid identifier.
        _run(
            [
                "python3",
                str(tree / "tools/include/xen-foreign/mkheader.py"),
                arch,
                f"{arch}.h.tmp",
                str(public / f"arch-x86/xen-{arch}.h"),
                str(public / "arch-x86/xen.h"),
                str(public / "xen.h"),
            ],
            log_path,
            cwd=foreign,
            what=f"generating the {arch} foreign headers",
        )
        text = (foreign / f"{arch}.h.tmp").read_text()
        # As Xen's own Makefile does: no alignment attribute inside a cast.
        text = re.sub(r"\(__align8__ (uint64_t)\)", r"(\1)", text)
        (foreign / f"{arch}.h").write_text(text)
        (foreign / f"{arch}.h.tmp").unlink()


def apply_gdbsx_patch(tree: Path, log_path: Path) -> None:
    patch = tree.parent / GDBSX_PATCH
    patch.write_text(gdbsx_patch_text())
    _run(
        ["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
        log_path,
        cwd=tree,
        what="applying the gdbsx loopback patch",
    )


def compile_gdbsx(tree: Path, include: Path, output: Path, log_path: Path) -> bool:
    """Compile gdbsx; True when statically linked, so dom0 needs no extra library."""
    sources = [str(tree / GDBSX_DIR / name) for name in GDBSX_SOURCES]
    command = ["gcc", *GDBSX_CFLAGS, f"-I{include}", "-o", str(output), *sources]
    try:
        _run([*command[:1], "-static", *command[1:]], log_path, what="linking gdbsx")
    except HostError:
        # Limitation: without libc.a gdbsx links dynamically; it then needs only
        # glibc, which every dom0 has (gdbsx calls Xen through privcmd ioctls and
        # uses no Xen library).
        log.warning("static link of gdbsx failed; linking it dynamically")
        _run(command, log_path, what="compiling gdbsx")
    return elf_is_static(output)


def _build_gdbsx(tree: Path, work: Path, log_path: Path) -> tuple[Path, bool]:
    apply_gdbsx_patch(tree, log_path)
    include = work / "include"
    public_headers(tree, include, log_path)
    output = work / "gdbsx"
    static = compile_gdbsx(tree, include, output, log_path)
    return output, static


# ---------------------------------------------------------------- cache


def load_debug_xen(directory: Path) -> DebugXen:
    meta = json.loads((directory / METADATA).read_text())
    return DebugXen(
        version=meta["version"],
        directory=directory,
        hypervisor=directory / meta["hypervisor"],
        gdbsx=directory / meta["gdbsx"],
        xen_syms=directory / meta["xen_syms"],
        config=directory / meta["config"],
        full_version=meta["full_version"],
        xen_extra=meta["xen_extra"],
        build_id=meta["build_id"],
        gdbsx_static=meta["gdbsx_static"],
        build_seconds=meta["seconds"]["total"],
    )


def cached_debug_xen(cache_dir: Path, xen_version: str) -> DebugXen | None:
    """The cached build of this version and recipe, or None."""
    directory = artefact_dir(cache_dir, xen_version)
    if (directory / METADATA).is_file():
        return load_debug_xen(directory)
    return None


def build_debug_xen(
    cache_dir: Path,
    xen_version: str,
    progress: Progress = print,
    *,
    mirror: str | None = None,
    security_mirror: str | None = None,
    jobs: int | None = None,
) -> DebugXen:
    """Return the gdbsx hypervisor and tool for this Xen version, building once.

    `xen_version` is the Debian package version dom0 runs (4.17.5+72-g01140da4e8-1).
    The mirrors default to the host's own Debian sources.
    """
    check_version(xen_version)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cached_debug_xen(cache_dir, xen_version)
    if cached is not None:
        log.info("using the cached gdbsx hypervisor %s", cached.hypervisor)
        return cached
    with _locked(cache_dir):
        cached = cached_debug_xen(cache_dir, xen_version)
        if cached is not None:
            return cached
        target = artefact_dir(cache_dir, xen_version)
        log_path = cache_dir / f"{target.name}.build.log"
        log_path.unlink(missing_ok=True)
        started = time.monotonic()
        ensure_build_deps(progress)
        dsc = fetch_source(
            cache_dir,
            xen_version,
            mirror=mirror,
            security_mirror=security_mirror,
            log_path=log_path,
            progress=progress,
        )
        fetched = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-xen-", dir=cache_dir))
        try:
            meta, hypervisor_done = _build(
                work, dsc, xen_version, log_path, progress, jobs
            )
            finished = time.monotonic()
            meta["seconds"] = {
                "fetch": round(fetched - started, 1),
                "hypervisor": round(hypervisor_done - fetched, 1),
                "gdbsx": round(finished - hypervisor_done, 1),
                "total": round(finished - started, 1),
            }
            out = work / "out"
            (out / METADATA).write_text(
                json.dumps(meta, indent=2, sort_keys=True) + "\n"
            )
            shutil.copy2(log_path, out / "build.log")
            os.rename(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = load_debug_xen(target)
    cache.prune_superseded(target, f"xen-{_without_epoch(xen_version)}-gdbsx-*")
    progress(
        f"xen-debug: built {result.hypervisor.name} and gdbsx in "
        f"{result.build_seconds:.0f} s"
    )
    return result


def _build(
    work: Path,
    dsc: Path,
    xen_version: str,
    log_path: Path,
    progress: Progress,
    jobs: int | None,
) -> tuple[dict, float]:
    """Unpack, configure and build; the artefacts end up in work/out."""
    tree = work / "src"
    progress(f"xen-debug: unpack {dsc.name} and apply Debian's patches")
    _unpack(dsc, tree, log_path)
    env = build_env(
        os.environ, xen_version=xen_version, source_date_epoch=_source_date_epoch(tree)
    )
    settings = _configure_hypervisor(tree, env, log_path)
    jobs = jobs or os.cpu_count() or 1
    progress(
        f"xen-debug: build the hypervisor with CONFIG_GDBSX (-j{jobs}, about two "
        "minutes on two cores)"
    )
    full_version = _make_hypervisor(tree, env, log_path, jobs)
    _check_hypervisor(tree)
    hypervisor_done = time.monotonic()
    progress("xen-debug: build gdbsx (listening on 127.0.0.1 only)")
    gdbsx, static = _build_gdbsx(tree, work, log_path)

    out = work / "out"
    out.mkdir()
    boot_name = f"xen-{full_version}.gz"
    shutil.copy2(tree / "xen/xen.gz", out / boot_name)
    shutil.copy2(tree / "xen/xen-syms", out / f"xen-syms-{full_version}")
    shutil.copy2(tree / "xen/.config", out / f"xen-{full_version}.config")
    shutil.copy2(gdbsx, out / "gdbsx")
    meta = {
        "format": 1,
        "version": xen_version,
        "key": build_key(xen_version),
        "full_version": full_version,
        "xen_extra": xen_extra(full_version),
        "build_id": elf_build_id(tree / "xen/xen-syms"),
        "hypervisor": boot_name,
        "xen_syms": f"xen-syms-{full_version}",
        "config": f"xen-{full_version}.config",
        "gdbsx": "gdbsx",
        "gdbsx_static": static,
        "kconfig": {
            name: settings.get(name, "n")
            for name in ("CONFIG_EXPERT", "CONFIG_GDBSX", "CONFIG_VERBOSE_DEBUG")
        },
    }
    return meta, hypervisor_done
