"""Role imds: the metadata emulator and the metadata-fake vif hotplug script."""


def test_metadata_service_runs_and_starts_at_boot(host):
    service = host.service("pvlab-imds")
    assert service.is_running
    assert service.is_enabled


def test_metadata_service_listens_only_on_the_bridge_address(host, pvlab_settings):
    listening = [
        s for s in host.socket.get_listening_sockets()
        if s.endswith(f":{pvlab_settings.imds_port}")
    ]
    assert listening == [f"tcp://{pvlab_settings.bridge_address}:{pvlab_settings.imds_port}"]


def test_hotplug_script_is_installed_and_executable(host):
    hook = host.file("/etc/xen/scripts/metadata-fake")
    assert hook.is_file and hook.mode & 0o111
    assert host.run("bash -n /etc/xen/scripts/metadata-fake").rc == 0
    assert hook.contains('. "$dir/vif-bridge"')


def test_hotplug_script_refuses_a_hostile_vif_name(host):
    before = host.check_output("iptables -w -t nat -S PREROUTING")
    result = host.run(
        "vif='vif1.0;touch /tmp/pwned' XENBUS_PATH=/local/domain/0/backend/vif/999/0 "
        "/etc/xen/scripts/metadata-fake online"
    )
    assert result.rc != 0
    assert not host.file("/tmp/pwned").exists
    assert host.check_output("iptables -w -t nat -S PREROUTING") == before


def test_metadata_service_comes_back_after_being_killed(host, pvlab_settings):
    before = host.check_output("systemctl show -p MainPID --value pvlab-imds")
    host.run_expect([0], "systemctl kill --signal=KILL pvlab-imds")
    # Restart=always with RestartSec=1: bounded wait, it must be back in seconds.
    result = host.run(
        "for i in $(seq 1 30); do pid=$(systemctl show -p MainPID --value pvlab-imds);"
        f" if [ \"$pid\" != 0 ] && [ \"$pid\" != {before} ] &&"
        f" ss -ltn | grep -q '{pvlab_settings.bridge_address}:"
        f"{pvlab_settings.imds_port} ';"
        " then exit 0; fi; sleep 1; done; exit 1"
    )
    assert result.rc == 0, "pvlab-imds did not come back within 30 s"


def test_control_socket_answers_root_and_only_root(host):
    sock = host.file("/var/lib/pvlab/imds/control.sock")
    assert sock.is_socket and sock.user == "root" and sock.mode == 0o600
    ask = (
        "curl --silent --show-error --fail-with-body --max-time 10 --unix-socket "
        "/var/lib/pvlab/imds/control.sock --request DELETE http://imds/guests/nobody"
    )
    assert host.check_output(ask) == "guest nobody was not registered"
    as_nobody = host.run(f"runuser -u nobody -- {ask}")
    # curl's exit 7: it could not connect (the socket is root's, mode 0600).
    assert as_nobody.rc == 7 and as_nobody.stdout == ""
