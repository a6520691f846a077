"""What guests leave behind in dom0: one snapshot of every per-guest resource.

A guest's life adds a NAT rule, a vif, xenstore backend entries, maybe a loop
device, and registrations for the IMDS and DHCP; destroying it must take all of
them away again. Two snapshots compared show what leaked.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pvlab.domain import DHCP_HOSTS_DIR, GUESTS_DIR, IMDS_STATE_DIR
from pvlab.vm import Dom0

# One SSH round trip: each section starts with a marker line, then its items.
_SCRIPT = f"""
echo @domains; xl list | awk 'NR > 1 && $1 != "Domain-0" {{print $1}}'
echo @nat_rules; iptables -w -t nat -S | grep -v '^-[PN] '
echo @vifs; ls /sys/class/net | grep '^vif' || true
echo @loop_devices; losetup -a -O NAME,BACK-FILE -n 2>/dev/null || true
echo @xenstore_backends
for kind in $(xenstore-list /local/domain/0/backend 2>/dev/null); do
  for domid in $(xenstore-list /local/domain/0/backend/$kind 2>/dev/null); do
    echo "$kind/$domid"
  done
done
echo @imds_registrations; ls {IMDS_STATE_DIR}/guests 2>/dev/null || true
echo @dhcp_hosts; ls {DHCP_HOSTS_DIR} 2>/dev/null || true
echo @guest_dirs; ls {GUESTS_DIR} 2>/dev/null || true
echo @gdbsx; pgrep -a -x gdbsx || true
echo @imds_memory_kib
ps -o rss= -p "$(systemctl show -p MainPID --value pvlab-imds)" 2>/dev/null || true
"""


@dataclass(frozen=True)
class Footprint:
    domains: frozenset[str]
    nat_rules: frozenset[str]
    vifs: frozenset[str]
    loop_devices: frozenset[str]
    xenstore_backends: frozenset[str]
    imds_registrations: frozenset[str]
    dhcp_hosts: frozenset[str]
    guest_dirs: frozenset[str]
    gdbsx: frozenset[str]
    imds_memory_kib: int = 0

    def leaks_since(self, before: Footprint) -> list[str]:
        """One line per resource present now that was not there before."""
        lines = []
        for f in fields(self):
            if f.name == "imds_memory_kib":
                continue
            added = getattr(self, f.name) - getattr(before, f.name)
            lines += [f"{f.name}: {item}" for item in sorted(added)]
        return lines

    def counts(self) -> dict[str, int]:
        counts = {
            f.name: len(getattr(self, f.name))
            for f in fields(self)
            if f.name != "imds_memory_kib"
        }
        counts["imds_memory_kib"] = self.imds_memory_kib
        return counts


def parse(text: str) -> Footprint:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = sections.setdefault(line[1:].strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    memory = sections.pop("imds_memory_kib", [])
    names = {f.name for f in fields(Footprint)} - {"imds_memory_kib"}
    missing = names - sections.keys()
    if missing:
        raise ValueError(f"footprint output lacks {', '.join(sorted(missing))}")
    return Footprint(
        **{name: frozenset(sections[name]) for name in names},
        imds_memory_kib=int(memory[0]) if memory and memory[0].isdigit() else 0,
    )


def take(dom0: Dom0) -> Footprint:
    """Snapshot dom0's per-guest resources now."""
    return parse(dom0.run(_SCRIPT).stdout)
