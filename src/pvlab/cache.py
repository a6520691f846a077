"""Cache entries are keyed by a hash of their inputs; when inputs change, a new
entry is built under a new name and the old one would stay forever. Building it
removes the entries it supersedes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def prune_superseded(current: Path, pattern: str) -> list[Path]:
    """Delete the siblings of `current` that match the glob `pattern` (files or
    directories) and do not start with its name; return what was deleted.
    `current` and its companions (current.sha256, current.build.log) stay."""
    removed = []
    for entry in sorted(current.parent.glob(pattern)):
        if entry.name.startswith(current.name) or entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, superseded by %s", entry, current.name)
        removed.append(entry)
    return removed
