"""Wall time of a cold `invoke demo`, as on a fresh machine.

Clones this checkout's HEAD into a temporary directory and runs the README's first
command there: a new virtualenv, `pip install -e .`, `invoke demo`. Nothing is
reused: its own empty cache directory (so the base box, the apt cache, the Xen
build and the sample image are all made anew), its own Vagrant home, and its own
VM name and management network, so an existing pvlab VM is left alone. Only the
host's Debian packages are already installed (pvlab installs them on a bare
machine; removing them here would take libvirt from under other VMs).

Prints the total and each step's time (goal: under 40 minutes here), then removes
the VM, its network, apt cache and caches (`invoke clean --cache`) unless --keep.
Usage: python bench/demo.py [--keep]. Takes about half an hour under emulation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    keep = "--keep" in sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="pvlab-bench-demo-"))
    checkout = work / "pvlab"
    env = dict(
        os.environ,
        PVLAB_CACHE_DIR=str(work / "cache"),
        VAGRANT_HOME=str(work / "vagrant.d"),
        PVLAB_NAME_PREFIX="pvlabbench",
        PVLAB_MGMT_NETWORK="198.18.2.0/24",
        PIP_NO_CACHE_DIR="1",
    )
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
    started = time.monotonic()
    demo = subprocess.run(
        "python3 -m venv .venv && .venv/bin/pip install --quiet -e . && "
        ".venv/bin/invoke demo",
        shell=True, cwd=checkout, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, check=False,
    )
    total = time.monotonic() - started
    sys.stdout.write(demo.stdout)
    try:
        if demo.returncode != 0:
            raise SystemExit(f"invoke demo failed (exit {demo.returncode}); see above")
        print()
        for line in demo.stdout.splitlines():
            if "time:" in line:
                print(line)
        print(f"cold demo, wall time:     {total:7.0f} s = {total / 60:.1f} min "
              "(goal < 40 min)")
    finally:
        if keep:
            print(f"kept: {checkout} (its settings are in this script)")
        else:
            subprocess.run([".venv/bin/invoke", "clean", "--cache"], cwd=checkout,
                           env=env, check=False)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
