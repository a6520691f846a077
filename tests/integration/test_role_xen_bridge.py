"""Role xen_bridge: xenbr0 with its own address, DHCP, bridge netfilter."""


def test_xenbr0_is_up_with_its_address(host, pvlab_settings):
    xenbr0 = host.interface("xenbr0")
    assert xenbr0.exists
    assert pvlab_settings.bridge_address in xenbr0.addresses


def test_xenbr0_is_written_to_come_back_after_reboot(host):
    config = host.file("/etc/network/interfaces.d/xenbr0")
    assert config.contains("^auto xenbr0")
    assert host.file("/etc/network/interfaces").contains("interfaces.d")


def test_bridged_frames_pass_through_iptables_now_and_after_reboot(host):
    call_iptables = host.file("/proc/sys/net/bridge/bridge-nf-call-iptables")
    assert call_iptables.content_string.strip() == "1"
    assert host.file("/etc/modules-load.d/pvlab-bridge.conf").contains("br_netfilter")
    assert host.file("/etc/sysctl.d/90-pvlab-bridge.conf").contains("call-iptables = 1")


def test_dhcp_serves_the_bridge_only(host):
    assert host.service("dnsmasq").is_running
    assert host.service("dnsmasq").is_enabled
    config = host.file("/etc/dnsmasq.d/pvlab-xenbr0.conf").content_string
    assert "interface=xenbr0" in config and "port=0" in config
    # Bound to the bridge device itself: no DHCP answers on any other interface.
    listening = host.check_output("ss -lun")
    assert "%xenbr0:67 " in listening
    assert not any(
        line.split()[3].endswith(":67") and "%xenbr0" not in line
        for line in listening.splitlines()[1:]
    )
