"""How much pvlab adds to a boot: `invoke boot` against a bare `xl create`.

Both boot the sample volume in the same dom0 to the moment the guest has printed
its user-data; the bare run gets its registration and xl config ready-made and is
timed from `xl create -c` alone. Prints both times and their ratio (goal: at most
1.10). Needs a provisioned dom0 (`invoke provision`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from pvlab import domain, instance_types, sample, settings as settings_mod
from pvlab.settings import PROJECT_ROOT
from pvlab.vm import Dom0


def time_until_marker(argv: list[str], timeout: float = 600) -> float:
    """Seconds from starting argv until the user-data end marker is printed."""
    started = time.monotonic()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if sample.END_MARKER.encode() in raw:
                elapsed = time.monotonic() - started
                proc.wait(timeout=timeout)
                return elapsed
            if time.monotonic() - started > timeout:
                break
        proc.kill()
    raise SystemExit(f"no user-data marker within {timeout:.0f} s from {argv[:3]}")


def main() -> None:
    s = settings_mod.load()
    dom0 = Dom0(s)
    guests = domain.Guests(dom0, s)
    image = sample.build_sample_image(Path(s.cache_dir) / "images")

    pvlab_seconds = time_until_marker([
        sys.executable, "-m", "invoke", "boot", "--image", str(image),
        "--name", "bench-pvlab", "--memory", "256", "--instance-type", "t1.micro",
    ])

    mac = "00:16:3e:be:0c:01"
    spec = domain.GuestSpec(
        name="bench-bare", image=image,
        instance_type=instance_types.lookup("t1.micro"), memory=256, mac=mac,
        ip=domain.ip_for_mac(mac, s.bridge_network), user_data=b"{}",
    )
    guests.destroy(spec.name)
    guests.prepare(spec, progress=lambda message: None)
    try:
        bare_seconds = time_until_marker(dom0.ssh_argv(
            f"sudo xl create -c {shlex.quote(spec.config_path)}", tty=True
        ))
    finally:
        guests.destroy(spec.name)

    print(f"invoke boot to user-data:   {pvlab_seconds:6.1f} s")
    print(f"bare xl create to user-data: {bare_seconds:6.1f} s")
    print(f"ratio pvlab / bare:          {pvlab_seconds / bare_seconds:6.2f} (goal <= 1.10)")


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT / "src"))
    main()
