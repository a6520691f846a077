"""Role xen_host: Xen from Debian runs with this VM as dom0."""


def test_xen_runs_with_the_vm_as_dom0(host):
    assert "control_d" in host.file("/proc/xen/capabilities").content_string
    info = host.check_output("xl info")
    assert "xen_version            : 4.17" in info


def test_hypervisor_skips_the_boot_time_memory_scrub(host):
    assert "bootscrub=false" in host.check_output("xl info | grep xen_commandline")


def test_xen_is_the_default_boot_entry(host):
    grub = host.file("/boot/grub/grub.cfg").content_string
    default = host.file("/etc/default/grub.d/zz-pvlab-xen.cfg").content_string
    assert "with Xen hypervisor" in default
    assert "multiboot2" in grub or "multiboot" in grub


def test_packages_come_only_through_the_host_apt_cache(host, pvlab_settings):
    proxy = host.file("/etc/apt/apt.conf.d/01pvlab-proxy").content_string
    assert pvlab_settings.apt_proxy in proxy
