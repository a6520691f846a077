"""Memory and vCPUs of the EC2 instance types that can boot paravirtualised (PV) images.

Values are the ones EC2 documents for its previous-generation types; every current
generation type is HVM only and cannot boot a PV image.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvlab.errors import SettingsError


@dataclass(frozen=True)
class InstanceType:
    name: str
    memory_mib: int
    vcpus: int


def _gib(value: float) -> int:
    return int(round(value * 1024))


PV_INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("t1.micro", 613, 1),
        InstanceType("m1.small", _gib(1.7), 1),
        InstanceType("m1.medium", _gib(3.75), 1),
        InstanceType("m1.large", _gib(7.5), 2),
        InstanceType("m1.xlarge", _gib(15), 4),
        InstanceType("m2.xlarge", _gib(17.1), 2),
        InstanceType("m2.2xlarge", _gib(34.2), 4),
        InstanceType("m2.4xlarge", _gib(68.4), 8),
        InstanceType("m3.medium", _gib(3.75), 1),
        InstanceType("m3.large", _gib(7.5), 2),
        InstanceType("m3.xlarge", _gib(15), 4),
        InstanceType("m3.2xlarge", _gib(30), 8),
        InstanceType("c1.medium", _gib(1.7), 2),
        InstanceType("c1.xlarge", _gib(7), 8),
        InstanceType("c3.large", _gib(3.75), 2),
        InstanceType("c3.xlarge", _gib(7.5), 4),
        InstanceType("c3.2xlarge", _gib(15), 8),
        InstanceType("c3.4xlarge", _gib(30), 16),
        InstanceType("c3.8xlarge", _gib(60), 32),
        InstanceType("hi1.4xlarge", _gib(60.5), 16),
        InstanceType("hs1.8xlarge", _gib(117), 16),
    )
}

# Families that exist on EC2 but boot only HVM images.
HVM_ONLY_FAMILIES = (
    "t2", "t3", "t3a", "t4g", "m4", "m5", "m5a", "m5n", "m5zn", "m6a", "m6g", "m6i",
    "m7a", "m7g", "m7i", "c4", "c5", "c5a", "c5n", "c6a", "c6g", "c6i", "c7a", "c7g",
    "c7i", "r3", "r4", "r5", "r6a", "r6g", "r6i", "r7g", "r7i", "i2", "i3", "i4i",
    "d2", "d3", "x1", "x1e", "x2idn", "z1d", "g2", "g3", "g4dn", "g5", "p2", "p3",
    "p4d", "p5", "inf1", "inf2", "trn1", "a1", "cc2", "cg1", "cr1", "h1",
)


def lookup(name: str) -> InstanceType:
    if name in PV_INSTANCE_TYPES:
        return PV_INSTANCE_TYPES[name]
    family = name.split(".", 1)[0]
    if family in HVM_ONLY_FAMILIES:
        raise SettingsError(
            f"instance type {name} is HVM only and cannot boot a PV image on EC2; "
            f"choose a PV-capable type such as t1.micro, m1.small or m3.medium."
        )
    raise SettingsError(
        f"unknown instance type {name!r}; PV-capable types are "
        f"{', '.join(PV_INSTANCE_TYPES)}."
    )
