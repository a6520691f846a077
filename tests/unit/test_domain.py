import ipaddress
import json
from pathlib import Path

import pytest

from pvlab import domain, instance_types
from pvlab.errors import DomainError, SettingsError, UserDataError

from helpers import guest_spec

spec = guest_spec


def test_xl_config_boots_pvgrub_with_the_metadata_hook():
    text = domain.render_xl_config(spec())
    assert 'name = "aws-test"' in text
    assert 'kernel = "/var/lib/pvlab/pvgrub/pvgrub2-x86_64-hd0.elf"' in text
    assert 'extra = "(hd0)/boot/grub/menu.lst"' in text
    assert "memory = 256" in text and "vcpus = 1" in text
    assert "'bridge=xenbr0,script=metadata-fake,mac=00:16:3e:58:88:57'" in text
    assert "'/var/lib/pvlab/guests/aws-test/boot-vol.img,raw,sda1,rw'" in text
    assert 'on_crash = "preserve"' in text


def test_hd00_variant_reads_the_first_partition():
    text = domain.render_xl_config(spec(pvgrub_variant="hd00"))
    assert 'extra = "(hd0,0)/boot/grub/menu.lst"' in text
    assert "pvgrub2-x86_64-hd00.elf" in text


def test_address_follows_the_mac_and_stays_on_the_bridge():
    net = ipaddress.ip_network("198.19.0.0/16")
    seen = set()
    for last in ("00:00", "00:01", "ff:fc", "12:34", "ab:cd"):
        ip = ipaddress.ip_address(domain.ip_for_mac(f"00:16:3e:00:{last}", str(net)))
        assert ip in net
        assert ip not in (net.network_address, net.network_address + 1,
                          net.broadcast_address)
        seen.add(ip)
    assert len(seen) == 5
    assert domain.ip_for_mac("00:16:3e:aa:12:34", str(net)) == domain.ip_for_mac(
        "00:16:3e:aa:12:34", str(net)
    )


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "Domain-0", "a;rm"])
def test_bad_guest_names_are_refused(name):
    with pytest.raises(DomainError, match="not valid"):
        domain.validate_name(name)


@pytest.mark.parametrize(
    "mac", ["00:16:3e:58:88", "zz:16:3e:58:88:57", "01:00:5e:00:00:01"]
)
def test_bad_macs_are_refused(mac):
    with pytest.raises(DomainError):
        domain.validate_mac(mac)


def test_random_macs_are_xen_unicast():
    mac = domain.random_mac()
    assert domain.validate_mac(mac).startswith("00:16:3e:")


def test_env_pairs_build_unik_user_data_map():
    data = domain.read_user_data(None, ["A=1", "B=x=y"], False)
    assert json.loads(data) == {"A": "1", "B": "x=y"}


def test_default_user_data_is_an_empty_map_and_none_means_404():
    assert domain.read_user_data(None, None, False) == b"{}"
    assert domain.read_user_data(None, None, True) is None


@pytest.mark.parametrize("pairs, message", [
    (["NOEQUALS"], "KEY=VALUE"),
    (["A=1", "A=2"], "given twice"),
])
def test_bad_env_pairs_are_refused(pairs, message):
    with pytest.raises(UserDataError, match=message):
        domain.read_user_data(None, pairs, False)


def test_user_data_file_is_served_byte_for_byte(tmp_path):
    blob = bytes(range(256)) * 4
    (tmp_path / "ud").write_bytes(blob)
    assert domain.read_user_data(tmp_path / "ud", None, False) == blob


def test_user_data_over_16_kib_is_refused_like_ec2(tmp_path):
    (tmp_path / "ud").write_bytes(b"x" * (16 * 1024 + 1))
    with pytest.raises(UserDataError, match="16 KiB"):
        domain.read_user_data(tmp_path / "ud", None, False)


def test_unreadable_user_data_names_the_file(tmp_path):
    with pytest.raises(UserDataError, match="cannot be read"):
        domain.read_user_data(tmp_path / "missing", None, False)


def test_instance_types_size_guests_and_refuse_hvm_only():
    assert instance_types.lookup("m1.small").memory_mib == 1741
    assert instance_types.lookup("c1.medium").vcpus == 2
    with pytest.raises(SettingsError, match="HVM only"):
        instance_types.lookup("t2.micro")
    with pytest.raises(SettingsError, match="unknown instance type"):
        instance_types.lookup("z9.huge")


class FakeDom0:
    """Answers every command with one exit status, as an unprovisioned VM would."""

    def __init__(self, returncode: int, stdout: str = "") -> None:
        self.returncode = returncode
        self.stdout = stdout

    def run(self, command, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(command, self.returncode, self.stdout, "")


def test_a_dom0_without_xen_tools_is_reported_as_not_provisioned():
    from pvlab import settings

    guests = domain.Guests(FakeDom0(127), settings.Settings())

    with pytest.raises(DomainError, match="not provisioned; run `invoke provision`"):
        guests.list()


SURVEY = """@xl
Name                                        ID   Mem VCPUs	State	Time(s)
Domain-0                                     0  1024     2     r-----      10.0
g1                                           3   256     1     -b----       1.0
@guests
g1
gone
@dhcp
00:16:3e:00:00:01,198.19.0.3,g1
00:16:3e:00:00:02,198.19.0.4,gone
@info
free_memory            : 900
@pvgrub
pvgrub2-x86_64-hd0.elf
pvgrub2-x86_64-hd00.elf
"""


class RecordingDom0(FakeDom0):
    def __init__(self, stdout: str) -> None:
        super().__init__(0, stdout)
        self.commands: list[str] = []

    def run(self, command, **kwargs):
        self.commands.append(command)
        return super().run(command, **kwargs)


def test_one_survey_answers_every_question_before_a_boot():
    from pvlab import settings

    dom0 = RecordingDom0(SURVEY)
    survey = domain.Guests(dom0, settings.Settings()).survey()

    assert [d["name"] for d in survey.domains] == ["g1"]
    assert survey.guest_dirs == ["g1", "gone"]
    assert survey.macs["00:16:3e:00:00:01"] == "g1"
    assert survey.free_memory == 900
    assert len(dom0.commands) == 1


def test_prune_forgets_guests_that_no_longer_run_and_frees_their_macs():
    from pvlab import settings

    dom0 = RecordingDom0(SURVEY)
    guests = domain.Guests(dom0, settings.Settings())
    survey = guests.survey()

    guests.prune(survey)

    assert "--name gone" in dom0.commands[-1]
    assert "00:16:3e:00:00:02" not in survey.macs
    with pytest.raises(DomainError, match="already running"):
        guests.check_new(spec(name="g1"), survey)
    with pytest.raises(DomainError, match="needs 1024 MiB but Xen has 900"):
        guests.check_new(spec(name="g2", memory=1024), survey)


def test_survey_skips_guests_another_boot_is_still_creating(tmp_path):
    import os
    import subprocess
    import time

    from pvlab import settings

    dom0 = RecordingDom0(SURVEY)
    domain.Guests(dom0, settings.Settings()).survey()
    script = dom0.commands[0]
    listing = script[script.index("echo @guests"):script.index("echo @dhcp")]
    for name in ("leftover", "in-flight", "abandoned"):
        (tmp_path / name).mkdir()
    (tmp_path / "in-flight" / domain.CREATING).touch()
    marker = tmp_path / "abandoned" / domain.CREATING
    marker.touch()
    an_hour_ago = time.time() - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))

    out = subprocess.run(
        ["sh", "-c", listing.replace(domain.GUESTS_DIR, str(tmp_path))],
        capture_output=True, text=True, check=True,
    ).stdout

    assert out.split() == ["@guests", "abandoned", "leftover"]


@pytest.fixture
def control_socket(tmp_path, monkeypatch):
    """The registration script's dom0 paths in tmp_path, with a real metadata
    control socket answering on it (in a short directory: Unix socket paths are
    limited to about 100 bytes)."""
    import shutil
    import tempfile
    import threading
    from pathlib import Path

    from pvlab import imds

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this host (dom0 has it)")
    state = tmp_path / "imds"
    monkeypatch.setattr(domain, "IMDS_STATE_DIR", str(state))
    monkeypatch.setattr(domain, "DHCP_HOSTS_DIR", str(tmp_path / "dhcp"))
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pvlab-ctl-") as short:
        path = Path(short) / "control.sock"
        monkeypatch.setattr(domain, "IMDS_CONTROL_SOCKET", str(path))
        server = imds.ControlServer(path, state, imds.Settings.from_mapping({}))
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={"poll_interval": 0.05})
        thread.start()
        yield state, server
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run_register_script(guest):
    import subprocess

    from pvlab import settings

    script = domain.Guests(RecordingDom0(""), settings.Settings())._register_script(
        guest
    )
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          timeout=60)


def test_register_script_registers_through_the_control_socket(control_socket,
                                                               tmp_path):
    state, _ = control_socket

    result = _run_register_script(spec(user_data=b'{"K": "v"}'))

    assert result.returncode == 0, result.stderr
    record = json.loads((state / "guests" / "aws-test.json").read_text())
    assert (record["mac"], record["ip"], record["user_data_b64"]) == (
        "00:16:3e:58:88:57", "198.19.136.89", "eyJLIjogInYifQ=="
    )
    assert (tmp_path / "dhcp" / "aws-test").read_text() == (
        "00:16:3e:58:88:57,198.19.136.89,aws-test\n"
    )


def test_register_script_exits_91_with_the_refusal(control_socket, tmp_path):
    assert _run_register_script(spec(name="first")).returncode == 0

    result = _run_register_script(spec(name="second"))  # same MAC and address

    assert result.returncode == 91
    assert "already belongs to guest first" in result.stderr
    assert not (tmp_path / "dhcp" / "second").exists()


def test_register_script_exits_92_when_the_service_does_not_answer(control_socket):
    _, server = control_socket
    server.server_close()  # the socket file goes away, as when the service is down

    result = _run_register_script(spec())

    assert result.returncode == 92
    assert "invoke provision" in result.stderr


def test_register_script_without_user_data_registers_none(control_socket):
    state, _ = control_socket

    assert _run_register_script(spec(user_data=None)).returncode == 0
    record = json.loads((state / "guests" / "aws-test.json").read_text())
    assert record["user_data_b64"] is None


class LocalDom0:
    """Runs dom0's shell scripts on this host (paths redirected by the test)."""

    def __init__(self):
        self.streamed: list[str] = []

    def run(self, command, check=True, **kwargs):
        import subprocess

        return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=60)

    def run_with_sparse_file(self, command, local, member):
        import subprocess

        self.streamed.append(member)
        tar = subprocess.Popen(
            ["tar", "--create", "--sparse", "--file", "-", "--directory",
             str(local.parent), "--transform", f"s,.*,{member},", local.name],
            stdout=subprocess.PIPE,
        )
        result = subprocess.run(["sh", "-c", command], stdin=tar.stdout,
                                capture_output=True, timeout=60)
        tar.wait()
        return result


@pytest.fixture
def local_dom0(control_socket, tmp_path, monkeypatch):
    monkeypatch.setattr(domain, "GUESTS_DIR", str(tmp_path / "guests"))
    monkeypatch.setattr(domain, "VOLUMES_DIR", str(tmp_path / "volumes"))
    return LocalDom0()


def _prepare(dom0, image, name):
    from pvlab import settings

    guests = domain.Guests(dom0, settings.Settings())
    survey = domain.Survey([], [], {}, 4096, volumes={
        p.name for p in (image.parent.parent / "volumes").glob("*.img")
    })
    mac = f"00:16:3e:00:00:{len(dom0.streamed) + 10:02x}"
    guest = spec(name=name, image=image, mac=mac, ip=domain.ip_for_mac(
        mac, "198.19.0.0/16"))
    guests.prepare(guest, lambda m: None, volume=domain.volume_key(image),
                   survey=survey)
    return guest


def test_a_volume_sent_once_is_copied_inside_dom0_the_next_times(local_dom0,
                                                                  tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    image = images / "boot-vol.img"
    with image.open("wb") as f:
        f.write(b"menu.lst" * 1000)
        f.truncate(8 << 20)

    first = _prepare(local_dom0, image, "first")
    second = _prepare(local_dom0, image, "second")

    assert len(local_dom0.streamed) == 1  # the second came from dom0's copy
    for guest in (first, second):
        assert Path(guest.disk).read_bytes() == image.read_bytes()
    kept = tmp_path / "volumes" / f"{domain.volume_key(image)}.img"
    assert kept.stat().st_blocks * 512 < 1 << 20  # still sparse


def test_dom0_keeps_only_the_newest_volumes(local_dom0, tmp_path):
    import os

    images = tmp_path / "images"
    images.mkdir()
    for n in range(domain.VOLUMES_KEPT + 2):
        image = images / f"v{n}.img"
        image.write_bytes(b"volume %d" % n)
        _prepare(local_dom0, image, f"g{n}")
        kept = tmp_path / "volumes" / f"{domain.volume_key(image)}.img"
        os.utime(kept, (1_000_000 + n, 1_000_000 + n))  # coarse clocks: order them

    names = sorted(p.name for p in (tmp_path / "volumes").iterdir())
    newest = sorted(f"{domain.volume_key(images / f'v{n}.img')}.img"
                    for n in range(2, domain.VOLUMES_KEPT + 2))
    assert names == newest


def test_a_kept_volume_pruned_since_the_survey_is_sent_after_all(local_dom0,
                                                                 tmp_path):
    from pvlab import settings

    image = tmp_path / "boot-vol.img"
    image.write_bytes(b"volume")
    key = domain.volume_key(image)
    survey = domain.Survey([], [], {}, 4096, volumes={f"{key}.img"})  # but gone

    domain.Guests(local_dom0, settings.Settings()).prepare(
        spec(image=image), lambda m: None, volume=key, survey=survey
    )

    assert local_dom0.streamed and (tmp_path / "volumes" / f"{key}.img").exists()
