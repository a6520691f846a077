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


class _Dom0:
    def __init__(self, uuid):
        self.uuid = uuid

    def libvirt_uuid(self):
        return self.uuid


def test_a_dom0_domain_this_checkout_does_not_own_is_refused_before_vagrant_up(
    monkeypatch,
):
    import pytest

    from pvlab import provision
    from pvlab.errors import VmError

    s = settings.load(environ={})
    monkeypatch.setattr(
        host, "project_domains",
        lambda _: [("pvlab-mgmt-x", "u0"), (s.domain_name, "u1")],
    )

    provision.refuse_foreign_domain(s, _Dom0("u1"))  # its own: fine
    with pytest.raises(VmError, match="invoke clean --stale") as refused:
        provision.refuse_foreign_domain(s, _Dom0(None))
    assert str(refused.value).count(". ") == 0 and s.domain_name in str(refused.value)


def test_clean_cache_deletes_the_box_copies_of_its_prefix_only(monkeypatch):
    import subprocess

    calls = []
    volumes = "\n".join([
        "pvlab-dom0.img",
        "pvlab-VAGRANTSLASH-debian12_vagrant_box_image_0_17_box.img",
        "pvlabci-VAGRANTSLASH-debian12_vagrant_box_image_0_18_box.img",
        "other-VAGRANTSLASH-debian12_vagrant_box_image_0_19_box.img",
    ])

    def virsh(*args, check=True):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, volumes if args[0] == "vol-list"
                                           else "", "")

    monkeypatch.setattr(host, "virsh", virsh)
    host.remove_box_volumes(settings.load(environ={}), progress=lambda m: None)

    assert [c[1] for c in calls if c[0] == "vol-delete"] == [
        "pvlab-VAGRANTSLASH-debian12_vagrant_box_image_0_17_box.img"
    ]
