"""Helpers the test tiers share: the `invoke` command line and the PV test kernel."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from pvlab import domain, image, instance_types, sample
from pvlab.settings import PROJECT_ROOT

PVKERNEL = PROJECT_ROOT / "tests" / "fixtures" / "pvkernel"


def invoke(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `invoke ARGS` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def guest_spec(**overrides) -> domain.GuestSpec:
    """A guest as `invoke boot` would describe it; overrides change any field."""
    values = dict(
        name="aws-test",
        image=Path("boot-vol.img"),
        instance_type=instance_types.lookup("t1.micro"),
        memory=256,
        mac="00:16:3e:58:88:57",
        ip="198.19.136.89",
        user_data=b"{}",
    )
    values.update(overrides)
    return domain.GuestSpec(**values)


def _load_pvkernel_build():
    # The fixture's builder is a script beside its sources, not a package.
    spec = importlib.util.spec_from_file_location(
        "pvkernel_build", PVKERNEL / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pvkernel = _load_pvkernel_build()


def held_sample_volume(settings, out: Path) -> tuple[Path, Path]:
    """A copy of the sample volume booting with pvlab.hold=1 (the guest stays up
    and asks the IMDS for its instance-id every 10 s), and its kernel file."""
    built = sample.build_sample_image(Path(settings.cache_dir) / "images")
    volume = out / "held.img"
    shutil.copyfile(built, volume)
    menu = out / "menu.lst"
    command_line = f"{sample.KERNEL_COMMAND_LINE} {sample.HOLD_OPTION}"
    menu.write_text(sample.menu_lst("hd0", command_line))
    script = out / "edit.cmd"
    script.write_text(
        f'rm /boot/grub/menu.lst\ncd /boot/grub\nwrite "{menu}" menu.lst\n'
    )
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(volume)],
        check=True,
        capture_output=True,
    )
    program = out / "program.bin"
    program.write_bytes(image.BootVolume(volume).read_file("/boot/program.bin"))
    assert (
        sample.HOLD_OPTION
        in image.BootVolume(volume).read_file("/boot/grub/menu.lst").decode()
    )
    return volume, program
