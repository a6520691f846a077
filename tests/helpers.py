"""Helpers the test tiers share: the `invoke` command line and the PV test kernel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from pvlab.settings import PROJECT_ROOT

PVKERNEL = PROJECT_ROOT / "tests" / "fixtures" / "pvkernel"


def invoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `invoke ARGS` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load_pvkernel_build():
    # The fixture's builder is a script beside its sources, not a package.
    spec = importlib.util.spec_from_file_location(
        "pvkernel_build", PVKERNEL / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pvkernel = _load_pvkernel_build()
