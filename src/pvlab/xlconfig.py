"""Hand-written xl domain configs, as the hand-run recipe has users write them.

pvlab reads the parts it needs (name, memory, vcpus, the vif's MAC, the boot
volume) and boots the guest its own way: its PV-GRUB, its bridge and hook.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from pvlab.errors import DomainError

_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*$")


@dataclass
class XlConfig:
    path: Path
    values: dict[str, object]

    @property
    def name(self) -> str | None:
        return self._str("name")

    @property
    def kernel(self) -> str | None:
        return self._str("kernel")

    @property
    def memory(self) -> int | None:
        value = self.values.get("memory")
        return int(value) if value is not None else None

    @property
    def vcpus(self) -> int | None:
        value = self.values.get("vcpus")
        return int(value) if value is not None else None

    @property
    def mac(self) -> str | None:
        for spec in self._list("vif"):
            for part in spec.split(","):
                key, _, value = part.strip().partition("=")
                if key == "mac":
                    return value
        return None

    @property
    def disk(self) -> tuple[str, str]:
        """(path, vdev) of the boot volume: the first disk."""
        disks = self._list("disk")
        if not disks:
            raise DomainError(f"{self.path} names no disk; add the boot volume, e.g. "
                              "disk = [ '/path/boot-vol.img,raw,sda1,rw' ].")
        fields = [f.strip() for f in disks[0].split(",")]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        positional = [f for f in fields if "=" not in f]
        target = named.get("target") or (positional[0] if positional else "")
        vdev = named.get("vdev") or (positional[2] if len(positional) > 2 else "xvda")
        if not target:
            raise DomainError(f"{self.path}: the first disk has no path.")
        return target, vdev

    def _str(self, key: str) -> str | None:
        value = self.values.get(key)
        return str(value) if value is not None else None

    def _list(self, key: str) -> list[str]:
        value = self.values.get(key, [])
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def parse(path: Path) -> XlConfig:
    """Read an xl config: `key = value` lines, values strings, numbers or lists."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DomainError(
            f"xl config {path} cannot be read ({exc.strerror})."
        ) from None
    values: dict[str, object] = {}
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not pending and not line.strip():
            continue
        if not pending:
            start = number
        pending += " " + line.strip()
        if pending.count("[") > pending.count("]"):
            continue
        match = _LINE_RE.match(pending.strip())
        pending = ""
        if not match:
            raise DomainError(f"{path}:{start}: not a `key = value` line.")
        key, value = match.groups()
        try:
            values[key] = ast.literal_eval(value.rstrip(";"))
        except (ValueError, SyntaxError):
            raise DomainError(
                f"{path}:{start}: cannot read the value of {key}."
            ) from None
    return XlConfig(Path(path), values)


def _strip_comment(line: str) -> str:
    """The line without a trailing # comment, ignoring # inside quotes."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#":
            return line[:index]
    return line
