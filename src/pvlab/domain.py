"""Guest domains in dom0: render the xl config, register the guest, create, watch, destroy.

A guest's files live in dom0 under /var/lib/pvlab/guests/<name>/; its IMDS and DHCP
registrations are removed with it, so nothing of a destroyed guest remains.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import shlex
import signal
import subprocess
import time
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
DHCP_HOSTS_DIR = "/var/lib/pvlab/dhcp-hosts"
PVGRUB_DIR = "/var/lib/pvlab/pvgrub"
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
        raise DomainError(f"MAC address {mac} is a multicast address; use a unicast one.")
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
        return f"{PVGRUB_DIR}/pvgrub2-x86_64-{self.pvgrub_variant}.elf"

    @property
    def extra(self) -> str:
        root = "(hd0)" if self.pvgrub_variant == "hd0" else "(hd0,0)"
        return f"{root}/boot/grub/menu.lst"


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


def read_user_data(path: Path | None, env: list[str] | None, none: bool) -> bytes | None:
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


@dataclass
class Guests:
    """The guest domains of one dom0, driven through `xl` over SSH."""

    dom0: Dom0
    settings: Settings

    def list(self) -> list[dict]:
        result = self.dom0.run("xl list", check=False)
        domains = []
        for line in result.stdout.splitlines()[1:]:
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

    def exists(self, name: str) -> bool:
        return self.dom0.run(f"xl domid {shlex.quote(name)}", check=False).returncode == 0

    def free_memory(self) -> int:
        out = self.dom0.run("xl info").stdout
        match = re.search(r"^free_memory\s*:\s*(\d+)", out, re.M)
        return int(match.group(1)) if match else 0

    def registered_macs(self) -> dict[str, str]:
        """MAC -> guest name of every DHCP registration in dom0."""
        out = self.dom0.run(
            f"cat {DHCP_HOSTS_DIR}/* 2>/dev/null || true", check=False
        ).stdout
        macs = {}
        for line in out.splitlines():
            parts = line.strip().split(",")
            if len(parts) >= 3:
                macs[parts[0]] = parts[2]
        return macs

    def prune(self) -> None:
        """Forget registrations of guests that no longer run (e.g. powered off)."""
        running = {d["name"] for d in self.list()}
        out = self.dom0.run(f"ls {GUESTS_DIR} 2>/dev/null || true", check=False).stdout
        for name in out.split():
            if name not in running:
                log.debug("pruning leftovers of %s", name)
                self.forget(name)

    def check_new(self, spec: GuestSpec) -> None:
        if self.exists(spec.name):
            raise DomainError(
                f"a guest named {spec.name} is already running; destroy it with "
                f"`invoke destroy --name {spec.name}` or choose another --name."
            )
        owner = self.registered_macs().get(spec.mac)
        if owner and owner != spec.name:
            raise DomainError(
                f"MAC address {spec.mac} is already used by guest {owner}; choose "
                "another or leave --mac out."
            )
        free = self.free_memory()
        if spec.memory > free:
            raise DomainError(
                f"{spec.name} needs {spec.memory} MiB but Xen has {free} MiB free; "
                "use a smaller --instance-type, --memory, or destroy other guests."
            )

    def register(self, spec: GuestSpec) -> None:
        q = shlex.quote
        cmd = (
            f"python3 {IMDS_SCRIPT} register --state-dir {IMDS_STATE_DIR} "
            f"--name {q(spec.name)} --mac {spec.mac} --ip {spec.ip} "
            f"--instance-type {q(spec.instance_type.name)} "
            f"--pvgrub-variant {spec.pvgrub_variant} "
        )
        if spec.user_data is None:
            cmd += "--no-user-data"
            stdin: bytes = b""
        else:
            cmd += "--user-data-file -"
            stdin = spec.user_data
        # A new guest of an old name is a new instance: its request log starts
        # empty (the old one stays readable until then, for post-mortems).
        cmd = f"rm -f {IMDS_STATE_DIR}/logs/{q(spec.name)}.jsonl*; {cmd}"
        result = self.dom0.run(cmd, input=stdin, check=False)
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise DomainError(
                f"the metadata service refused {spec.name}: "
                f"{message[-1] if message else 'no reason given'}"
            )
        for line in result.stderr.decode(errors="replace").splitlines():
            if line.strip():
                log.warning("%s", line.strip())
        host_line = f"{spec.mac},{spec.ip},{spec.name}\n"
        self.dom0.run(
            f"mkdir -p {DHCP_HOSTS_DIR} && cat > {DHCP_HOSTS_DIR}/{q(spec.name)}",
            input=host_line,
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
        self.dom0.run(
            f"python3 {IMDS_SCRIPT} unregister --state-dir {IMDS_STATE_DIR} "
            f"--name {q}; rm -f {DHCP_HOSTS_DIR}/{q}; rm -rf {GUESTS_DIR}/{q}",
            check=False,
        )

    def prepare(self, spec: GuestSpec, progress=log.info) -> None:
        progress(f"copying {spec.image} into dom0")
        self.dom0.run(f"mkdir -p {shlex.quote(spec.guest_dir)}")
        self.dom0.copy_to(spec.image, spec.disk)
        self.dom0.run(
            f"cat > {shlex.quote(spec.config_path)}", input=render_xl_config(spec)
        )
        progress(
            f"registering {spec.name}: mac {spec.mac}, address {spec.ip}, "
            f"{spec.instance_type.name} ({spec.memory} MiB, "
            f"{spec.vcpus or spec.instance_type.vcpus} vCPU)"
        )
        self.register(spec)

    def create_paused(self, spec: GuestSpec) -> None:
        result = self.dom0.run(f"xl create -p {shlex.quote(spec.config_path)}", check=False)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise DomainError(
                f"xl create of {spec.name} failed ({reason}); see /var/log/xen/ "
                f"in dom0 or `invoke report --name {spec.name}`."
            )

    def console(self, name: str, log_file: Path, unpause: bool = True) -> int:
        """Attach the console, unpause, stream until the guest is gone."""
        q = shlex.quote(name)
        # sh -c has no job control, so the console in the background keeps the
        # terminal; it is attached before the guest runs its first instruction.
        remote = (
            f"xl console {q} & console=$!; sleep 1; "
            + (f"xl unpause {q}; " if unpause else "")
            + "wait $console"
        )
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
                return proc.wait()
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
