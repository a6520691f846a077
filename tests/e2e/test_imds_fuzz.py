"""A bounded fuzz of the IMDS from inside dom0 against its own bridge address."""

from __future__ import annotations

import json

from pvlab.settings import PROJECT_ROOT

REMOTE = "/tmp/pvlab-imds-fuzz.py"


def test_imds_keeps_answering_good_requests_through_a_fuzz(
    dom0_vm, host, pvlab_settings
):
    dom0_vm.copy_to(PROJECT_ROOT / "scripts" / "imds-fuzz.py", REMOTE)
    pid = host.check_output("systemctl show -p MainPID --value pvlab-imds").strip()
    try:
        out = host.check_output(
            f"python3 {REMOTE} {pvlab_settings.bridge_address} "
            f"{pvlab_settings.imds_port} {pid} --rounds 3"
        )
    finally:
        host.run(f"rm -f {REMOTE}")
    figures = json.loads(out)

    assert figures["good_answered"] == figures["good_asked"] > 0, figures
    # Same process: it neither crashed nor was restarted by systemd meanwhile.
    assert host.check_output("systemctl show -p MainPID --value pvlab-imds") == pid
    growth_mib = (figures["rss_kib_after"] - figures["rss_kib_before"]) / 1024
    assert growth_mib < 16, figures
