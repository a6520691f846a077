"""Running commands: each is logged at DEBUG, failures raise with their stderr."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pvlab.errors import HostError

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A command exited non-zero; carries what it printed on stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        last = self.stderr.splitlines()[-1] if self.stderr else "no message"
        super().__init__(f"{shlex.join(self.argv)} failed ({returncode}): {last}")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    timeout: float | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """Run argv; text output captured unless capture is False (then it streams)."""
    log.debug("run: %s", shlex.join(argv))
    text = not isinstance(input, bytes)
    result = subprocess.run(
        list(argv),
        input=input,
        text=text,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        stderr = result.stderr if capture else ""
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        raise CommandError(argv, result.returncode, stderr or "")
    return result


def run_logged(
    cmd: Sequence[str],
    log_path: Path,
    *,
    what: str,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a build step with its output appended to log_path; a failure is one
    sentence naming `what` failed and where the output is."""
    log.debug("running %s", " ".join(cmd))
    with log_path.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(
            list(cmd),
            check=False,
            input=stdin,
            text=True,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        raise HostError(
            f"{what} failed ({cmd[0]} exited with {result.returncode}); "
            f"its output is in {log_path}."
        )


def succeeds(argv: Sequence[str], timeout: float | None = 30) -> bool:
    try:
        return run(argv, check=False, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ansible_command(name: str) -> str:
    """An Ansible command (ansible-playbook, ansible-inventory) of the ansible-core
    pinned with pvlab, next to this interpreter, before any other on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name
