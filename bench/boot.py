"""How much pvlab adds to a boot: `invoke boot` against a bare `xl create`.

Both boot the sample volume in the same dom0 to the moment the guest has printed
its user-data; the bare run gets its registration and xl config ready-made and is
timed from `xl create -c` alone. Prints both times and their ratio (goal: at most
1.10). Needs a provisioned dom0 (`invoke provision`).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from _timing import time_until

from pvlab import domain, instance_types, sample
from pvlab import settings as settings_mod
from pvlab.vm import Dom0


def main() -> None:
    s = settings_mod.load()
    dom0 = Dom0(s)
    guests = domain.Guests(dom0, s)
    image = sample.build_sample_image(Path(s.cache_dir) / "images")

    pvlab_seconds = time_until([
        sys.executable, "-m", "invoke", "boot", "--image", str(image),
        "--name", "bench-pvlab", "--memory", "256", "--instance-type", "t1.micro",
    ], sample.END_MARKER)

    mac = "00:16:3e:be:0c:01"
    spec = domain.GuestSpec(
        name="bench-bare", image=image,
        instance_type=instance_types.lookup("t1.micro"), memory=256, mac=mac,
        ip=domain.ip_for_mac(mac, s.bridge_network), user_data=b"{}",
    )
    guests.destroy(spec.name)
    guests.prepare(spec, progress=lambda message: None)
    try:
        bare_seconds = time_until(dom0.ssh_argv(
            f"sudo xl create -c {shlex.quote(spec.config_path)}", tty=True
        ), sample.END_MARKER)
    finally:
        guests.destroy(spec.name)

    print(f"invoke boot to user-data:   {pvlab_seconds:6.1f} s")
    print(f"bare xl create to user-data: {bare_seconds:6.1f} s")
    ratio = pvlab_seconds / bare_seconds
    print(f"ratio pvlab / bare:          {ratio:6.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
