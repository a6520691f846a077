"""The dom0 VM: python-vagrant for its life cycle, plain OpenSSH for commands in it.

Each Vagrant call costs about a second of Ruby start-up, so commands inside dom0 go
through `ssh -F` with the configuration Vagrant printed once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import vagrant

from pvlab.errors import VmError
from pvlab.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

MACHINE = "dom0"


@dataclass
class Dom0:
    settings: Settings
    root: Path = PROJECT_ROOT
    accel: str = "qemu"

    @property
    def state_dir(self) -> Path:
        return self.root / ".vagrant"

    @property
    def vagrant_settings_file(self) -> Path:
        return self.state_dir / "pvlab.json"

    @property
    def ssh_config_file(self) -> Path:
        return self.state_dir / "pvlab-ssh-config"

    def _vagrant(self, quiet: bool = True) -> vagrant.Vagrant:
        env = dict(os.environ, PVLAB_VAGRANT_SETTINGS=str(self.vagrant_settings_file))
        # Vagrant's progress bar is a stream of terminal escapes in logs.
        env.setdefault("VAGRANT_NO_COLOR", "1")
        return vagrant.Vagrant(
            str(self.root),
            quiet_stdout=quiet,
            quiet_stderr=quiet,
            env=env,
        )

    def write_vagrant_settings(self) -> None:
        s = self.settings
        self.state_dir.mkdir(exist_ok=True)
        data = {
            "provider": s.provider,
            "accel": self.accel,
            "vm_memory": s.vm_memory,
            "vm_cpus": s.vm_cpus,
            "box_name": s.box_name,
            "mgmt_network": s.mgmt_network,
            "public_network": s.public_network,
            "public_network_interface": s.public_network_interface,
            "name_prefix": s.name_prefix,
            "mgmt_network_name": s.mgmt_network_name,
            "serial_log": s.serial_log,
        }
        self.vagrant_settings_file.write_text(json.dumps(data, indent=2) + "\n")

    def libvirt_uuid(self) -> str | None:
        """UUID of the libvirt domain this checkout's Vagrant state owns."""
        try:
            return (self.state_dir / "machines" / MACHINE / "libvirt" / "id").read_text(
            ).strip()
        except OSError:
            return None

    def status(self) -> str:
        if not (self.state_dir / "machines" / MACHINE).exists():
            return "not_created"
        try:
            statuses = self._vagrant().status(MACHINE)
        except subprocess.CalledProcessError:
            return "unknown"
        return statuses[0].state if statuses else "not_created"

    def up(self) -> None:
        self.write_vagrant_settings()
        self.ssh_config_file.unlink(missing_ok=True)
        # python-vagrant would pass Vagrant's box upload bar through as thousands
        # of terminal escapes; stream it here and keep every tenth percent.
        argv = [
            "vagrant", "up", MACHINE, "--no-provision",
            f"--provider={self.settings.provider}",
        ]
        env = dict(
            os.environ,
            PVLAB_VAGRANT_SETTINGS=str(self.vagrant_settings_file),
            VAGRANT_NO_COLOR="1",
        )
        if stream(argv, cwd=self.root, env=env, squash_progress=True) != 0:
            raise VmError(
                "`vagrant up` failed (see its output above; the VM's serial console "
                f"is in {self.settings.serial_log})."
            ) from None

    def reload(self) -> None:
        """Reboot the VM through Vagrant (halt, then up), without provisioning."""
        self.write_vagrant_settings()
        env = dict(
            os.environ,
            PVLAB_VAGRANT_SETTINGS=str(self.vagrant_settings_file),
            VAGRANT_NO_COLOR="1",
        )
        argv = ["vagrant", "reload", MACHINE, "--no-provision"]
        self.ssh_config_file.unlink(missing_ok=True)
        if stream(argv, cwd=self.root, env=env) != 0:
            raise VmError(
                "`vagrant reload` failed (see its output above; the VM's serial "
                f"console is in {self.settings.serial_log})."
            )
        # Written afresh for the rebooted VM, so SSH users that hold its path
        # (testinfra, a running task) find it again.
        self.ssh_config()

    def lost(self, what: str) -> VmError:
        """The error for an SSH session into dom0 that ended with its connection."""
        state = self.status()
        cause = (
            "the VM runs but stopped answering over SSH"
            if state == "running"
            else f"the VM is {state.replace('_', ' ')}"
        )
        return VmError(
            f"lost dom0 while {what}: {cause}; `invoke provision` starts it again."
        )

    def halt(self) -> None:
        self._vagrant(quiet=False).halt(vm_name=MACHINE)
        self.ssh_config_file.unlink(missing_ok=True)

    def destroy(self) -> None:
        self._vagrant(quiet=False).destroy(vm_name=MACHINE)
        self.ssh_config_file.unlink(missing_ok=True)

    def ssh_config(self) -> Path:
        if not self.ssh_config_file.exists():
            try:
                text = self._vagrant().ssh_config(vm_name=MACHINE)
            except subprocess.CalledProcessError:
                raise VmError(
                    "the dom0 VM is not running; start it with `invoke provision`."
                ) from None
            text = text.replace(f"Host {MACHINE}", "Host dom0", 1)
            self.ssh_config_file.write_text(text)
        return self.ssh_config_file

    def ssh_options(self) -> dict[str, str]:
        options: dict[str, str] = {}
        for line in self.ssh_config().read_text().splitlines():
            key, _, value = line.strip().partition(" ")
            if key and key != "Host":
                options[key] = value.strip().strip('"')
        return options

    def ssh_argv(self, command: str, tty: bool = False) -> list[str]:
        # One shared connection: a new SSH handshake costs seconds in an
        # emulated dom0, and a boot runs a dozen commands.
        argv = [
            "ssh", "-F", str(self.ssh_config()), "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=auto", "-o", "ControlPersist=60",
            "-o", f"ControlPath={self.state_dir / 'ssh-%C'}",
            # A VM that halts or hangs under a task ends the task within about
            # 30 s instead of leaving it waiting on a dead TCP connection.
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
        ]
        argv += ["-tt"] if tty else ["-T"]
        return [*argv, "dom0", command]

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 600,
    ) -> subprocess.CompletedProcess:
        """Run a shell command in dom0 as root; output captured as text."""
        argv = self.ssh_argv(f"sudo sh -c {shlex.quote(command)}")
        log.debug("dom0: %s", command)
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=not isinstance(input, bytes),
            timeout=timeout,
        )
        if result.returncode == 255:
            raise self.lost(f"running `{command}`")
        if check and result.returncode != 0:
            stderr = result.stderr
            if isinstance(stderr, bytes):
                stderr = stderr.decode(errors="replace")
            last = stderr.strip().splitlines()[-1:] or ["no message"]
            raise VmError(f"in dom0, `{command}` failed: {last[0]}")
        return result

    def stream_command(self, command: str) -> int:
        """Run a command in dom0 as root with its output streamed to the terminal."""
        code = stream(self.ssh_argv(f"sudo sh -c {shlex.quote(command)}"))
        if code == 255:
            raise self.lost(f"running `{command}`")
        return code

    def run_with_file(self, command: str, local: Path) -> subprocess.CompletedProcess:
        """Run a shell command in dom0 as root with a local file as its stdin."""
        log.debug("dom0 (stdin %s): %s", local, command)
        with local.open("rb") as source:
            result = subprocess.run(
                self.ssh_argv(f"sudo sh -c {shlex.quote(command)}"),
                stdin=source,
                capture_output=True,
            )
        if result.returncode == 255:
            raise self.lost("copying a file into it")
        return result

    def run_with_sparse_file(
        self, command: str, local: Path, member: str
    ) -> subprocess.CompletedProcess:
        """Run a shell command in dom0 as root with a tar stream on its stdin that
        holds the local file as `member`; holes travel as GNU tar sparse maps, so a
        64 MiB volume of 10 MiB data costs 10 MiB of SSH in the emulated dom0."""
        log.debug("dom0 (stdin: tar of %s as %s): %s", local, member, command)
        tar = subprocess.Popen(
            [
                "tar", "--create", "--sparse", "--file", "-",
                "--directory", str(local.parent),
                "--transform", f"s,.*,{member},", "--", local.name,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert tar.stdout is not None
        try:
            result = subprocess.run(
                self.ssh_argv(f"sudo sh -c {shlex.quote(command)}"),
                stdin=tar.stdout,
                capture_output=True,
            )
        finally:
            tar.stdout.close()
            tar_error = tar.stderr.read().decode(errors="replace").strip()
            tar.stderr.close()
            tar_code = tar.wait()
        if result.returncode == 255:
            raise self.lost("copying a file into it")
        if tar_code != 0:
            raise VmError(f"reading {local} for dom0 failed: {tar_error}")
        return result

    def copy_to(self, local: Path, remote: str) -> None:
        """Copy a file into dom0 (as root), streaming it through SSH."""
        remote_q = shlex.quote(remote)
        result = self.run_with_file(
            f"cat > {remote_q}.part && mv {remote_q}.part {remote_q}", local
        )
        if result.returncode != 0:
            raise VmError(
                f"copying {local} into dom0 failed: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    def ansible_inventory(self) -> Path:
        o = self.ssh_options()
        path = self.state_dir / "pvlab-inventory.ini"
        ssh_args = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        path.write_text(
            "[xen_hosts]\n"
            f"dom0 ansible_host={o['HostName']} ansible_port={o.get('Port', '22')} "
            f"ansible_user={o.get('User', 'vagrant')} "
            f"ansible_ssh_private_key_file={o['IdentityFile']} "
            f"ansible_ssh_common_args='{ssh_args}' "
            f"ansible_python_interpreter=/usr/bin/python3\n"
        )
        return path


PROGRESS_RE = re.compile(rb"Progress: (\d+)%")
SEGMENT_RE = re.compile(rb"\r|\n|\x1b\[K")


def stream(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    squash_progress: bool = False,
) -> int:
    """Run argv, copying its output to the terminal line by line.

    With squash_progress, Vagrant's redrawn `Progress: N%` bar becomes one line
    per ten percent, readable in a CI log.
    """
    log.debug("run: %s", shlex.join(argv))
    shown = -10
    pending = b""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if not squash_progress:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            *segments, pending = SEGMENT_RE.split(pending + chunk)
            for segment in segments:
                match = PROGRESS_RE.search(segment)
                if match:
                    percent = int(match.group(1))
                    if percent >= shown + 10:
                        shown = percent - percent % 10
                        sys.stdout.write(f"    upload {shown}%\n")
                elif segment.strip():
                    sys.stdout.buffer.write(segment + b"\n")
            sys.stdout.flush()
        if pending.strip():
            sys.stdout.buffer.write(pending + b"\n")
        return proc.wait()
