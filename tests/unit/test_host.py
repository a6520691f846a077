from pvlab import host, settings


def test_hardware_virtualisation_is_read_from_cpu_flags():
    assert host.cpu_has_hw_virt("flags\t\t: fpu vme vmx sse\n")
    assert host.cpu_has_hw_virt("flags\t\t: fpu svm\n")
    assert not host.cpu_has_hw_virt("flags\t\t: fpu vme sse2 hypervisor\n")


def test_forced_accel_is_kept():
    assert host.detect_accel("kvm") == "kvm"


def test_management_network_is_isolated_and_in_the_test_range(tmp_path):
    s = settings.load(root=tmp_path, environ={})
    xml = host.mgmt_network_xml(s)
    assert "<forward" not in xml
    assert "address='198.18.0.1'" in xml
    assert "<name>pvlab-mgmt</name>" in xml


def test_libvirt_that_cannot_be_started_is_one_sentence(monkeypatch):
    import itertools

    import pytest

    from pvlab.errors import HostError

    clock = itertools.count(0, 10)
    monkeypatch.setattr(host, "_libvirt_answers", lambda: False)
    monkeypatch.setattr(host, "systemd_is_init", lambda: False)
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(host.time, "sleep", lambda seconds: None)

    with pytest.raises(HostError, match="libvirtd is not running and could not be"):
        host.ensure_libvirt(lambda message: None)
