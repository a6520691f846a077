"""A second provisioning run finds nothing to change."""

from pvlab.provision import run_playbook


def test_second_provision_changes_nothing(dom0_vm, pvlab_settings, host):
    recap = run_playbook(dom0_vm, pvlab_settings)
    assert recap.failed == 0
    assert recap.changed == 0
