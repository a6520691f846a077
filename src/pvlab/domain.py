"""Guest domains in dom0: render the xl config, register, create, watch, destroy.

A guest's files live in dom0 under /var/lib/pvlab/guests/<name>/; its IMDS and DHCP
registrations are removed with it, so nothing of a destroyed guest remains.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import shlex
import signal
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from pvlab.errors import DomainError, UserDataError
from pvlab.instance_types import InstanceType
from pvlab.settings import PROJECT_ROOT, Settings
from pvlab.vm import Dom0

log = logging.getLogger(__name__)

GUESTS_DIR = "/var/lib/pvlab/guests"
IMDS_SCRIPT = "/opt/pvlab/imds.py"
IMDS_STATE_DIR = "/var/lib/pvlab/imds"
IMDS_CONTROL_SOCKET = f"{IMDS_STATE_DIR}/control.sock"
DHCP_HOSTS_DIR = "/var/lib/pvlab/dhcp-hosts"
PVGRUB_DIR = "/var/lib/pvlab/pvgrub"
# dom0 keeps the volumes it was sent last, by content hash: booting one again
# copies it inside dom0 instead of through SSH and tar (seconds under emulation).
VOLUMES_DIR = "/var/lib/pvlab/volumes"
VOLUMES_KEPT = 4
BRIDGE = "xenbr0"
USER_DATA_LIMIT = 16 * 1024
XEN_OUI = "00:16:3e"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name) or name == "Domain-0":
        raise DomainError(
            f"guest name {name!r} is not valid; use 1-64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit."
        )
    return name


def validate_mac(mac: str) -> str:
    mac = mac.lower()
    if not MAC_RE.match(mac):
        raise DomainError(
            f"MAC address {mac!r} is malformed; write six hex pairs like "
            "00:16:3e:12:34:56."
        )
    if int(mac[:2], 16) & 1:
        raise DomainError(
            f"MAC address {mac} is a multicast address; use a unicast one."
        )
    return mac


def ip_for_mac(mac: str, bridge_network: str) -> str:
    """The fixed address dom0's DHCP gives this MAC: from its last two bytes."""
    net = ipaddress.ip_network(bridge_network)
    # Skip the network address and the bridge's own; never the broadcast.
    usable = net.num_addresses - 3
    index = int(mac.replace(":", "")[-4:], 16) % usable
    return str(net.network_address + 2 + index)


def random_mac() -> str:
    return XEN_OUI + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


@dataclass
class GuestSpec:
    name: str
    image: Path
    instance_type: InstanceType
    memory: int
    mac: str
    ip: str
    user_data: bytes | None
    pvgrub_flavor: str = "pvgrub2"
    pvgrub_variant: str = "hd0"
    vdev: str = "sda1"
    vcpus: int | None = None
    on_crash: str = "preserve"
    extra_registration: dict = field(default_factory=dict)

    @property
    def guest_dir(self) -> str:
        return f"{GUESTS_DIR}/{self.name}"

    @property
    def disk(self) -> str:
        return f"{self.guest_dir}/boot-vol.img"

    @property
    def config_path(self) -> str:
        return f"{self.guest_dir}/{self.name}.cfg"

    @property
    def kernel(self) -> str:
        """The PV-GRUB image in dom0 that xl starts as the guest's kernel."""
        if self.pvgrub_flavor == "legacy":
            return f"{PVGRUB_DIR}/legacy-x86_64-{self.pvgrub_variant}.gz"
        return f"{PVGRUB_DIR}/pvgrub2-x86_64-{self.pvgrub_variant}.elf"

    @property
    def extra(self) -> str:
        """The menu.lst legacy PV-GRUB reads: its first command-line argument.

        PV-GRUB 2 ignores it (the lookup is built into its image); EC2's legacy
        AKIs read the same path from their own configuration.
        """
        root = "(hd0)" if self.pvgrub_variant == "hd0" else "(hd0,0)"
        return f"{root}/boot/grub/menu.lst"


def _missing_pvgrub(spec: GuestSpec) -> str:
    if spec.pvgrub_flavor == "legacy":
        return (
            f"dom0 has no legacy PV-GRUB image ({spec.kernel}); name a prebuilt "
            "pv-grub-x86_64.gz with the setting pvgrub_legacy_image_hd0 (or "
            "pvgrub_legacy_image_hd00), or set pvgrub_flavor: legacy and "
            "pvgrub_legacy_sources to the stubdom tarballs to build one, then run "
            "`invoke provision`."
        )
    return (
        f"dom0 has no PV-GRUB 2 image ({spec.kernel}); run `invoke provision`, "
        "which builds it."
    )


def render_xl_config(spec: GuestSpec) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PROJECT_ROOT / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("xl.cfg.j2").render(
        name=spec.name,
        instance_type=spec.instance_type.name,
        pvgrub_flavor=spec.pvgrub_flavor,
        pvgrub_variant=spec.pvgrub_variant,
        kernel=spec.kernel,
        extra=spec.extra,
        memory=spec.memory,
        vcpus=spec.vcpus or spec.instance_type.vcpus,
        bridge=BRIDGE,
        mac=spec.mac,
        disk=spec.disk,
        vdev=spec.vdev,
        on_crash=spec.on_crash,
    )


def read_user_data(
    path: Path | None, env: list[str] | None, none: bool
) -> bytes | None:
    """User-data bytes as the guest will get them; None means EC2's 404."""
    if none:
        return None
    if path is not None and env:
        raise UserDataError("give either --user-data or --env, not both.")
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserDataError(
                f"user-data file {path} cannot be read ({exc.strerror})."
            ) from None
    else:
        data = json.dumps(env_map(env or []), sort_keys=True).encode()
    if len(data) > USER_DATA_LIMIT:
        raise UserDataError(
            f"user-data is {len(data)} bytes; EC2 refuses more than {USER_DATA_LIMIT} "
            "bytes (16 KiB): shrink or compress it."
        )
    return data


def env_map(pairs: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserDataError(f"--env {pair!r} must have the form KEY=VALUE.")
        if key in result:
            raise UserDataError(f"--env key {key!r} is given twice; give it once.")
        result[key] = value
    return result


# In a guest's directory from its preparation until `xl create` has made it, so
# that a concurrent boot does not prune it as a leftover.
CREATING = ".creating"


def volume_key(image: Path) -> str:
    """The name dom0 keeps a volume under: a hash of its content."""
    digest = hashlib.sha256()
    with image.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def _control(method: str, url: str) -> str:
    """curl asking the metadata service's control socket; exit 22 on a refusal,
    whose sentence is the body."""
    return (
        f"curl --silent --show-error --fail-with-body --max-time 30 --unix-socket "
        f"{IMDS_CONTROL_SOCKET} --request {method} {shlex.quote(url)}"
    )


def _create_error(name: str, lines: list[str]) -> DomainError:
    reason = ([line for line in lines if line.strip()] or ["no message"])[-1]
    return DomainError(
        f"xl create of {name} failed ({reason}); see /var/log/xen/ in dom0 or "
        f"`invoke report --name {name}`."
    )


def _decode(data: bytes) -> str:
    """A shell pipeline stage printing these bytes (base64 keeps them literal)."""
    return f"echo {base64.b64encode(data).decode()} | base64 -d"


def _parse_xl_list(text: str) -> list[dict]:
    domains = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[0] != "Domain-0":
            domains.append({
                "name": parts[0],
                "domid": int(parts[1]),
                "memory": int(parts[2]),
                "vcpus": int(parts[3]),
                "state": parts[4],
            })
    return domains


def _parse_dhcp_hosts(text: str) -> dict[str, str]:
    """MAC -> guest name from dnsmasq dhcp-hostsdir lines "mac,ip,name"."""
    macs = {}
    for line in text.splitlines():
        parts = line.strip().split(",")
        if len(parts) >= 3:
            macs[parts[0]] = parts[2]
    return macs


@dataclass
class Survey:
    """What dom0 holds before a boot, fetched in one round trip."""

    domains: list[dict]
    guest_dirs: list[str]
    macs: dict[str, str]
    free_memory: int
    pvgrub_images: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)


@dataclass
class Guests:
    """The guest domains of one dom0, driven through `xl` over SSH."""

    dom0: Dom0
    settings: Settings

    def list(self) -> list[dict]:
        result = self.dom0.run("xl list", check=False)
        if result.returncode == 127:
            raise DomainError(
                "dom0 has no Xen tools yet (`xl` not found): the VM is not "
                "provisioned; run `invoke provision`."
            )
        return _parse_xl_list(result.stdout)

    def exists(self, name: str) -> bool:
        result = self.dom0.run(f"xl domid {shlex.quote(name)}", check=False)
        return result.returncode == 0

    def survey(self) -> Survey:
        """Domains, guest directories, DHCP registrations and free memory at once:
        one SSH round trip instead of one per question (each costs about half a
        second in an emulated dom0)."""
        script = (
            "echo @xl; xl list; echo @guests; "
            # A guest another boot is still creating (its marker younger than
            # 15 minutes) is not a leftover, though xl does not list it yet.
            "for d in " + GUESTS_DIR + "/*/; do [ -d \"$d\" ] || continue; "
            "[ -n \"$(find \"$d\"" + CREATING + " -mmin -15 2>/dev/null)\" ] && "
            "continue; basename \"$d\"; done; "
            "echo @dhcp; cat " + DHCP_HOSTS_DIR + "/* 2>/dev/null; "
            "echo @info; xl info | grep '^free_memory'; "
            "echo @pvgrub; ls " + PVGRUB_DIR + " 2>/dev/null; "
            "echo @volumes; ls " + VOLUMES_DIR + " 2>/dev/null; true"
        )
        result = self.dom0.run(script, check=False)
        sections: dict[str, list[str]] = {}
        current: list[str] = []
        for line in result.stdout.splitlines():
            if line.startswith("@"):
                current = sections.setdefault(line[1:], [])
            else:
                current.append(line)
        if not any(line.startswith("Name") for line in sections.get("xl", [])):
            raise DomainError(
                "dom0 has no working Xen tools (`xl list` failed): the VM is not "
                "provisioned or Xen is not running; run `invoke provision`."
            )
        free = re.search(r"(\d+)", " ".join(sections.get("info", [])))
        return Survey(
            domains=_parse_xl_list("\n".join(sections["xl"])),
            guest_dirs=[n for n in sections.get("guests", []) if n.strip()],
            macs=_parse_dhcp_hosts("\n".join(sections.get("dhcp", []))),
            free_memory=int(free.group(1)) if free else 0,
            pvgrub_images={n for n in sections.get("pvgrub", []) if n.strip()},
            volumes={n for n in sections.get("volumes", []) if n.strip()},
        )

    def prune(self, survey: Survey | None = None) -> None:
        """Forget registrations of guests that no longer run (e.g. powered off)."""
        survey = survey or self.survey()
        running = {d["name"] for d in survey.domains}
        for name in survey.guest_dirs:
            if name not in running:
                log.debug("pruning leftovers of %s", name)
                self.forget(name)
                survey.macs = {m: n for m, n in survey.macs.items() if n != name}

    def check_new(self, spec: GuestSpec, survey: Survey | None = None) -> None:
        survey = survey or self.survey()
        if spec.kernel.rsplit("/", 1)[-1] not in survey.pvgrub_images:
            raise DomainError(_missing_pvgrub(spec))
        if spec.name in {d["name"] for d in survey.domains}:
            raise DomainError(
                f"a guest named {spec.name} is already running; destroy it with "
                f"`invoke destroy --name {spec.name}` or choose another --name."
            )
        owner = survey.macs.get(spec.mac)
        if owner and owner != spec.name:
            raise DomainError(
                f"MAC address {spec.mac} is already used by guest {owner}; choose "
                "another or leave --mac out."
            )
        free = survey.free_memory
        if spec.memory > free:
            raise DomainError(
                f"{spec.name} needs {spec.memory} MiB but Xen has {free} MiB free; "
                "use a smaller --instance-type, --memory, or destroy other guests."
            )

    def _register_script(self, spec: GuestSpec) -> str:
        """Shell lines registering the guest with the IMDS (exit 91 on refusal,
        92 if the service does not answer) and with DHCP. The running service
        registers it through its control socket: curl starts in a fraction of the
        time a Python CLI takes in an emulated dom0. The user-data travels inline,
        base64-encoded."""
        q = shlex.quote
        options = {
            "mac": spec.mac,
            "ip": spec.ip,
            "instance-type": spec.instance_type.name,
            "pvgrub-variant": spec.pvgrub_variant,
        }
        if spec.user_data is None:
            options["no-user-data"] = "1"
        url = f"http://imds/guests/{spec.name}?{urllib.parse.urlencode(options)}"
        body = "" if spec.user_data is None else _decode(spec.user_data)
        host_line = f"{spec.mac},{spec.ip},{spec.name}\n"
        return (
            # A new guest of an old name is a new instance: its request log starts
            # empty (the old one stays readable until then, for post-mortems).
            f"rm -f {IMDS_STATE_DIR}/logs/{q(spec.name)}.jsonl*\n"
            f"{body or ':'} | {_control('PUT', url)} --data-binary @- >&2\n"
            "case $? in\n"
            "  0) ;;\n"
            "  22) exit 91 ;;\n"
            "  *) echo 'the metadata service in dom0 does not answer on its control "
            "socket; `invoke provision` restarts it' >&2; exit 92 ;;\n"
            "esac\n"
            f"mkdir -p {DHCP_HOSTS_DIR}\n"
            f"{_decode(host_line.encode())} > {DHCP_HOSTS_DIR}/{q(spec.name)}\n"
        )

    def _check_prepared(self, spec: GuestSpec, result) -> None:
        stderr = result.stderr
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        if result.returncode == 93:
            raise _create_error(spec.name, lines)
        if result.returncode == 91:
            raise DomainError(
                f"the metadata service refused {spec.name}: "
                f"{lines[-1] if lines else 'no reason given'}"
            )
        if result.returncode != 0:
            raise DomainError(
                f"preparing {spec.name} in dom0 failed: "
                f"{lines[-1] if lines else 'no message'}"
            )
        for line in lines:
            (log.debug if line.startswith("registered guest") else log.warning)(
                "%s", line
            )

    def imds_command(self, verb: str, name: str, *args: str) -> str:
        return shlex.join([
            "python3", IMDS_SCRIPT, verb, "--state-dir", IMDS_STATE_DIR,
            "--name", name, *args,
        ])

    def imds(self, verb: str, name: str, *args: str, input: bytes = b"") -> str:
        """Run an IMDS CLI verb for a guest in dom0; its refusal becomes an error."""
        result = self.dom0.run(self.imds_command(verb, name, *args), input=input,
                               check=False)
        stdout = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            raise DomainError(
                f"the metadata service refused: {lines[-1] if lines else 'no reason'}"
            )
        return stdout

    def forget(self, name: str) -> None:
        q = shlex.quote(name)
        # Through the running service; the CLI when it does not answer.
        self.dom0.run(
            f"{_control('DELETE', f'http://imds/guests/{name}')} >/dev/null 2>&1 || "
            f"python3 {IMDS_SCRIPT} unregister --state-dir {IMDS_STATE_DIR} "
            f"--name {q}; rm -f {DHCP_HOSTS_DIR}/{q}; rm -rf {GUESTS_DIR}/{q}",
            check=False,
        )

    def prepare(
        self,
        spec: GuestSpec,
        progress=log.info,
        files: dict[str, str] | None = None,
        create: bool = False,
        volume: str | None = None,
        survey: Survey | None = None,
    ) -> None:
        """Put the volume in place, write the xl config (and any other files),
        register the guest and, with `create`, create it paused, in one SSH round
        trip. A volume dom0 keeps (`volume` is its key, `volume_key`, and the
        survey lists it) is copied inside dom0; any other streams on stdin as a
        sparse tar and is kept for next time. The rest travels in the command."""
        q = shlex.quote
        kept = volume is not None and survey is not None and (
            f"{volume}.img" in survey.volumes
        )
        how = "using dom0's copy of {} and" if kept else "copying {} into dom0 and"
        progress(
            f"{how.format(spec.image)} registering {spec.name}: mac "
            f"{spec.mac}, address {spec.ip}, {spec.instance_type.name} "
            f"({spec.memory} MiB, {spec.vcpus or spec.instance_type.vcpus} vCPU)"
        )
        files = {spec.config_path: render_xl_config(spec), **(files or {})}
        part = f"{spec.disk}.part"
        if kept:
            cached = f"{VOLUMES_DIR}/{volume}.img"
            place = (
                # Pruned by another boot since the survey: exit 94, send it.
                f"cp --sparse=always {cached} {q(part)} || exit 94\n"
                f"touch {cached}\n"
            )
        else:
            place = f"tar --extract --file - --directory {q(spec.guest_dir)}\n"
            if volume is not None:
                tmp = f"{VOLUMES_DIR}/.{volume}.$$"
                place += (
                    f"mkdir -p {VOLUMES_DIR}\n"
                    f"{{ cp --sparse=always {q(part)} {tmp} && "
                    f"mv {tmp} {VOLUMES_DIR}/{volume}.img; }} || rm -f {tmp}\n"
                    f"ls -t {VOLUMES_DIR}/*.img | tail -n +{VOLUMES_KEPT + 1} | "
                    "xargs -r rm -f\n"
                )
        script = (
            f"set -e\nmkdir -p {q(spec.guest_dir)}\n"
            f"touch {q(spec.guest_dir)}/{CREATING}\n"
            + place
            + f"mv {q(part)} {q(spec.disk)}\n"
            + "".join(
                f"{_decode(text.encode())} > {q(path)}\n"
                for path, text in files.items()
            )
            + "set +e\n"
            + self._register_script(spec)
        )
        if create:
            script += (
                f"xl create -p {q(spec.config_path)} >&2 || exit 93\n"
                f"rm -f {q(spec.guest_dir)}/{CREATING}\n"
            )
        if kept:
            result = self.dom0.run(script, check=False)
            if result.returncode == 94:
                survey.volumes.discard(f"{volume}.img")
                return self.prepare(spec, progress, files, create, volume, survey)
        else:
            member = part.rsplit("/", 1)[-1]
            result = self.dom0.run_with_sparse_file(script, spec.image, member)
        self._check_prepared(spec, result)

    def console(self, name: str, log_file: Path, unpause: bool = True) -> int:
        """Unpause, attach the console, stream until the guest is gone."""
        q = shlex.quote(name)
        # As `xl create -c` does: the guest runs while the console attaches, and
        # xenconsoled keeps what it printed meanwhile for the console to read.
        remote = (f"xl unpause {q} && " if unpause else "") + f"exec xl console {q}"
        argv = self.dom0.ssh_argv(f"sudo sh -c {shlex.quote(remote)}", tty=True)
        log.debug("dom0: %s", remote)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ) as proc, log_file.open("ab") as sink:
            assert proc.stdout is not None
            try:
                for raw in proc.stdout:
                    line = raw.replace(b"\r", b"")
                    sink.write(line)
                    sink.flush()
                    print(line.decode(errors="replace"), end="", flush=True)
                code = proc.wait()
                if code == 255:
                    raise self.dom0.lost(f"streaming {name}'s console")
                return code
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()

    def destroy(self, name: str) -> bool:
        """Destroy the domain (if it runs) and forget the guest; True if it ran."""
        ran = self.exists(name)
        if ran:
            self.dom0.run(f"xl destroy {shlex.quote(name)}", check=False)
            deadline = time.monotonic() + 30
            while self.exists(name) and time.monotonic() < deadline:
                time.sleep(0.5)
        self.forget(name)
        return ran
