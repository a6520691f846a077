"""Contract tests of the IMDS emulator over loopback, against EC2's documented
behaviour; each test runs its own server on 127.0.0.1 with a temporary state dir."""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pvlab import imds

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMDS_FILE = ROOT / "src" / "pvlab" / "imds.py"
CAPTURE_SCRIPT = ROOT / "scripts" / "imds-capture.py"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvlabTestKeyOnly test@pvlab"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


class Imds:
    """A running emulator plus helpers to register guests and ask as one."""

    def __init__(
        self, tmp_path: Path, config: dict[str, Any], limits: imds.Limits
    ) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state_dir = tmp_path / "state"
        self.config_path = tmp_path / "imds.json"
        self.config_path.write_text(json.dumps(config))
        settings = imds.Settings.from_mapping(config)
        self.server = imds.make_server("127.0.0.1", 0, self.state_dir, settings, limits)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def cli(self, command: str, *args: str) -> int:
        extra = (
            ["--config", str(self.config_path)]
            if command in ("register", "import")
            else []
        )
        return imds.main([command, "--state-dir", str(self.state_dir), *extra, *args])

    def register(self, name: str = "g1", ip: str = "127.0.0.1", *args: str) -> int:
        mac = f"00:16:3e:00:00:{int(ip.rsplit('.', 1)[1]):02x}"
        return self.cli("register", "--name", name, "--ip", ip, "--mac", mac, *args)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> Reply:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=5, source_address=(source, 0)
        )
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            headers_ = {k.lower(): v for k, v in response.getheaders()}
            return Reply(response.status, headers_, body)
        finally:
            conn.close()

    def get(self, path: str, source: str = "127.0.0.1", **headers: str) -> Reply:
        return self.request("GET", path, _header_names(headers), source)

    def token(self, source: str = "127.0.0.1", ttl: int = 60) -> str:
        reply = self.request(
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)},
            source,
        )
        assert reply.status == 200
        return reply.text

    def raw(self, data: bytes, responses: int = 1) -> bytes:
        """Send bytes as they are; return that many responses (or all until the
        server closes)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(data)
            received = b""
            while _complete_responses(received) < responses:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received

    def log_entries(self, name: str) -> list[dict[str, Any]]:
        path = self.state_dir / "logs" / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def _complete_responses(data: bytes) -> int:
    count = 0
    while (end := data.find(b"\r\n\r\n")) >= 0:
        head = data[:end].lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(data) < end + 4 + length:
            break
        data = data[end + 4 + length :]
        count += 1
    return count


def _header_names(headers: dict[str, str]) -> dict[str, str]:
    return {name.replace("_", "-"): value for name, value in headers.items()}


@pytest.fixture
def make_imds(tmp_path: Path):
    servers: list[Imds] = []

    def make(limits: imds.Limits | None = None, **config: Any) -> Imds:
        config.setdefault("ssh_public_key", SSH_KEY)
        server = Imds(tmp_path / f"s{len(servers)}", config, limits or imds.Limits())
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def service(make_imds) -> Imds:
    server = make_imds()
    assert server.register("g1", "127.0.0.1") == 0
    return server


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


# ------------------------------------------------------------------ tree and codes


def test_root_lists_metadata_versions_ending_with_latest(service):
    reply = service.get("/")

    assert reply.status == 200
    versions = reply.text.split("\n")
    assert versions[0] == "1.0"
    assert versions[-1] == "latest"
    assert "2009-04-04" in versions


def test_latest_lists_dynamic_meta_data_and_user_data(service):
    assert service.get("/latest/").text.split("\n") == [
        "dynamic",
        "meta-data",
        "user-data",
    ]


def test_meta_data_lists_children_with_directories_ending_in_slash(service):
    children = service.get("/latest/meta-data/").text.split("\n")

    assert children == sorted(children)
    for directory in (
        "block-device-mapping/",
        "iam/",
        "network/",
        "placement/",
        "public-keys/",
        "services/",
        "events/",
    ):
        assert directory in children
    for leaf in ("ami-id", "instance-id", "local-ipv4", "mac", "kernel-id"):
        assert leaf in children


def test_directories_answer_with_and_without_trailing_slash(service):
    assert service.get("/latest/meta-data/placement").text == (
        service.get("/latest/meta-data/placement/").text
    )


def test_leaf_tolerates_trailing_slash(service):
    plain = service.get("/latest/meta-data/instance-id")
    slashed = service.get("/latest/meta-data/instance-id/")

    assert slashed.status == 200
    assert slashed.text == plain.text


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/no-such-thing",
        "/latest/meta-data/instance-id/deeper",
        "/1999-01-01/meta-data/",
        "/nonsense",
        "/latest/meta-data/spot/instance-action",
    ],
)
def test_unknown_path_is_404_with_ec2_error_page(service, path):
    reply = service.get(path)

    assert reply.status == 404
    assert reply.headers["content-type"] == "text/html"
    assert b"404 - Not Found" in reply.body


def test_server_header_is_ec2ws(service):
    assert service.get("/latest/meta-data/").headers["server"] == "EC2ws"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ami-launch-index", "0"),
        ("ami-manifest-path", "(unknown)"),
        ("block-device-mapping/ami", "/dev/sda1"),
        ("block-device-mapping/root", "/dev/sda1"),
        ("hostname", "ip-127-0-0-1.ec2.internal"),
        ("instance-action", "none"),
        ("instance-life-cycle", "on-demand"),
        ("instance-type", "m1.small"),
        ("local-hostname", "ip-127-0-0-1.ec2.internal"),
        ("local-ipv4", "127.0.0.1"),
        ("mac", "00:16:3e:00:00:01"),
        ("placement/availability-zone", "us-east-1a"),
        ("placement/region", "us-east-1"),
        ("profile", "default-paravirtual"),
        ("security-groups", "default"),
        ("services/domain", "amazonaws.com"),
        ("services/partition", "aws"),
        ("public-keys/", "0=pvlab"),
        ("public-keys/0/", "openssh-key"),
        ("public-keys/0/openssh-key", SSH_KEY),
        ("events/maintenance/scheduled", "[]"),
        ("iam/", "info\nsecurity-credentials/"),
        ("iam/security-credentials/", "pvlab-instance-role"),
    ],
)
def test_meta_data_leaf_has_ec2_value(service, path, expected):
    reply = service.get(f"/latest/meta-data/{path}")

    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain"
    assert reply.text == expected


def test_ids_have_ec2_shapes(service):
    import re

    assert re.fullmatch(
        r"ami-[0-9a-f]{17}", service.get("/latest/meta-data/ami-id").text
    )
    assert re.fullmatch(
        r"i-[0-9a-f]{17}", service.get("/latest/meta-data/instance-id").text
    )
    assert re.fullmatch(
        r"r-[0-9a-f]{17}", service.get("/latest/meta-data/reservation-id").text
    )


def test_network_interface_of_the_guest_mac_is_consistent(service):
    mac = service.get("/latest/meta-data/mac").text
    base = f"/latest/meta-data/network/interfaces/macs/{mac}"

    assert service.get("/latest/meta-data/network/interfaces/macs/").text == f"{mac}/"
    children = service.get(f"{base}/").text.split("\n")
    for leaf in ("device-number", "local-ipv4s", "mac", "subnet-id", "vpc-id"):
        assert leaf in children
    assert service.get(f"{base}/mac").text == mac
    assert service.get(f"{base}/local-ipv4s").text == "127.0.0.1"
    assert service.get(f"{base}/device-number").text == "0"
    assert service.get(f"{base}/subnet-id").text.startswith("subnet-")
    assert service.get(f"{base}/vpc-id").text.startswith("vpc-")


@pytest.mark.parametrize(
    ("region", "variant", "kernel_id"),
    [
        ("us-east-1", "hd0", "aki-919dcaf8"),
        ("us-east-1", "hd00", "aki-499ccb20"),
        ("eu-west-1", "hd0", "aki-52a34525"),
        ("us-west-2", "hd00", "aki-e68f11d6"),
    ],
)
def test_kernel_id_is_the_pvgrub_aki_of_variant_and_region(
    make_imds, region, variant, kernel_id
):
    server = make_imds(region=region)
    server.register("g1", "127.0.0.1", "--pvgrub-variant", variant)

    assert server.get("/latest/meta-data/kernel-id").text == kernel_id
    document = server.get("/latest/dynamic/instance-identity/document").json()
    assert document["kernelId"] == kernel_id


def test_hd00_guest_boots_from_the_whole_disk(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1", "--pvgrub-variant", "hd00")

    assert server.get("/latest/meta-data/block-device-mapping/root").text == "/dev/sda"


def test_region_outside_us_east_1_names_hosts_compute_internal(make_imds):
    server = make_imds(region="eu-west-1", availability_zone="eu-west-1b")
    server.register()

    hostname = server.get("/latest/meta-data/local-hostname").text
    assert hostname == "ip-127-0-0-1.eu-west-1.compute.internal"
    assert server.get("/latest/meta-data/placement/availability-zone").text == (
        "eu-west-1b"
    )


def test_identity_document_has_documented_fields_matching_meta_data(service):
    doc = service.get("/latest/dynamic/instance-identity/document").json()
    meta = "/latest/meta-data"

    assert set(doc) == {
        "accountId",
        "architecture",
        "availabilityZone",
        "billingProducts",
        "devpayProductCodes",
        "marketplaceProductCodes",
        "imageId",
        "instanceId",
        "instanceType",
        "kernelId",
        "pendingTime",
        "privateIp",
        "ramdiskId",
        "region",
        "version",
    }
    assert doc["instanceId"] == service.get(f"{meta}/instance-id").text
    assert doc["imageId"] == service.get(f"{meta}/ami-id").text
    assert doc["instanceType"] == service.get(f"{meta}/instance-type").text
    assert doc["privateIp"] == service.get(f"{meta}/local-ipv4").text
    assert doc["region"] == service.get(f"{meta}/placement/region").text
    assert doc["availabilityZone"] == (
        service.get(f"{meta}/placement/availability-zone").text
    )
    assert doc["architecture"] == "x86_64"
    assert doc["version"] == "2017-09-30"
    datetime.strptime(doc["pendingTime"], "%Y-%m-%dT%H:%M:%SZ")


def test_iam_info_and_role_credentials_are_fake_and_not_yet_expired(service):
    info = service.get("/latest/meta-data/iam/info").json()
    creds = service.get(
        "/latest/meta-data/iam/security-credentials/pvlab-instance-role"
    ).json()
    now = datetime.now(UTC)

    assert info["Code"] == "Success"
    assert info["InstanceProfileArn"].endswith(":instance-profile/pvlab-instance-role")
    assert creds["Code"] == "Success"
    assert creds["Type"] == "AWS-HMAC"
    assert creds["AccessKeyId"].startswith("ASIA") and len(creds["AccessKeyId"]) == 20
    assert "FAKE" in creds["SecretAccessKey"] and "FAKE" in creds["Token"]
    expiration = datetime.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    updated = datetime.strptime(creds["LastUpdated"], "%Y-%m-%dT%H:%M:%SZ")
    assert updated.replace(tzinfo=UTC) <= now < expiration.replace(tzinfo=UTC)


def test_no_iam_category_without_a_role(make_imds):
    server = make_imds(iam_role=None)
    server.register()

    assert "iam/" not in server.get("/latest/meta-data/").text.split("\n")
    assert server.get("/latest/meta-data/iam/info").status == 404


def test_public_keys_404_without_a_key(make_imds):
    server = make_imds(ssh_public_key=None)
    server.register()

    assert server.get("/latest/meta-data/public-keys/").status == 404
    assert "public-keys/" not in server.get("/latest/meta-data/").text.split("\n")


def test_head_answers_headers_without_body(service):
    reply = service.request("HEAD", "/latest/meta-data/instance-id")

    assert reply.status == 200
    assert reply.body == b""
    assert int(reply.headers["content-length"]) == len(
        service.get("/latest/meta-data/instance-id").body
    )


def test_one_connection_serves_several_requests(service):
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
    try:
        for path in ("/latest/meta-data/instance-id", "/latest/meta-data/mac"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------ per guest


def test_two_guests_get_their_own_identity(make_imds):
    server = make_imds()
    server.register("alpha", "127.0.0.1", "--instance-type", "m1.small")
    user_data = server.state_dir.parent / "beta.json"
    user_data.write_text('{"ROLE": "beta"}')
    server.register(
        "beta",
        "127.0.0.2",
        "--instance-type",
        "c1.medium",
        "--user-data-file",
        str(user_data),
    )

    def identity(source: str) -> tuple[str, ...]:
        return tuple(
            server.get(f"/latest/{p}", source=source).text
            for p in (
                "meta-data/instance-id",
                "meta-data/mac",
                "meta-data/local-ipv4",
                "meta-data/instance-type",
                "user-data",
            )
        )

    alpha, beta = identity("127.0.0.1"), identity("127.0.0.2")
    assert alpha[1:] == ("00:16:3e:00:00:01", "127.0.0.1", "m1.small", "{}")
    assert beta[1:] == (
        "00:16:3e:00:00:02",
        "127.0.0.2",
        "c1.medium",
        '{"ROLE": "beta"}',
    )
    assert alpha[0] != beta[0]


def test_unregistered_address_gets_404_and_is_logged(service, caplog):
    reply = service.get("/latest/meta-data/instance-id", source="127.0.0.3")

    assert reply.status == 404
    entries = service.log_entries(imds.UNREGISTERED_LOG)
    assert entries[-1]["source"] == "127.0.0.3"
    assert entries[-1]["status"] == 404
    assert "127.0.0.3" in caplog.text


def test_loopback_is_not_a_guest_unless_registered(make_imds):
    server = make_imds()

    assert server.get("/").status == 404


def test_registration_is_picked_up_and_dropped_without_restart(make_imds):
    server = make_imds()
    assert server.get("/latest/meta-data/instance-id").status == 404

    server.register()
    assert server.get("/latest/meta-data/instance-id").status == 200

    assert server.cli("unregister", "--name", "g1") == 0
    assert server.get("/latest/meta-data/instance-id").status == 404


def test_re_registration_with_new_values_is_served_at_once(service):
    service.register("g1", "127.0.0.1", "--instance-type", "m2.xlarge")

    assert service.get("/latest/meta-data/instance-type").text == "m2.xlarge"


def test_instance_id_is_stable_per_name_and_mac(make_imds):
    server = make_imds()
    server.register()
    first = server.get("/latest/meta-data/instance-id").text
    server.cli("unregister", "--name", "g1")
    server.register()

    assert server.get("/latest/meta-data/instance-id").text == first


def test_given_instance_id_is_served(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1", "--instance-id", "i-0123456789abcdef0")

    assert server.get("/latest/meta-data/instance-id").text == "i-0123456789abcdef0"


@pytest.mark.parametrize(
    "clash",
    [
        ["--name", "other", "--ip", "127.0.0.1", "--mac", "00:16:3e:00:00:09"],
        ["--name", "other", "--ip", "127.0.0.9", "--mac", "00:16:3e:00:00:01"],
        ["--name", "g1", "--ip", "127.0.0.1", "--mac", "00:16:3e:00:00:09"],
    ],
    ids=["same-ip", "same-mac", "same-name-other-mac"],
)
def test_register_refuses_a_guest_that_clashes_with_another(service, clash, capsys):
    assert service.cli("register", *clash) == 2
    assert "unregister" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad",
    [
        ["--name", "g2", "--ip", "300.0.0.1", "--mac", "00:16:3e:00:00:09"],
        ["--name", "g2", "--ip", "127.0.0.9", "--mac", "not-a-mac"],
        ["--name", "../evil", "--ip", "127.0.0.9", "--mac", "00:16:3e:00:00:09"],
        [
            "--name",
            "g2",
            "--ip",
            "127.0.0.9",
            "--mac",
            "00:16:3e:00:00:09",
            "--hop-limit",
            "65",
        ],
        [
            "--name",
            "g2",
            "--ip",
            "127.0.0.9",
            "--mac",
            "00:16:3e:00:00:09",
            "--instance-id",
            "i-xyz",
        ],
    ],
    ids=["ip", "mac", "name", "hop-limit", "instance-id"],
)
def test_register_refuses_malformed_input_with_one_sentence(service, bad, capsys):
    assert service.cli("register", *bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imds: ") and "\n" not in err


def test_unregister_is_idempotent_by_name_and_mac(service):
    assert service.cli("unregister", "--mac", "00:16:3E:00:00:01") == 0
    assert service.get("/latest/meta-data/").status == 404
    assert service.cli("unregister", "--mac", "00:16:3e:00:00:01") == 0
    assert service.cli("unregister", "--name", "g1") == 0


def test_unregister_succeeds_when_the_state_dir_does_not_exist(tmp_path):
    missing = tmp_path / "never-created"

    assert imds.main(["unregister", "--state-dir", str(missing), "--name", "x"]) == 0


def test_malformed_registration_file_is_skipped_not_fatal(service):
    (service.state_dir / "guests" / "broken.json").write_text("{not json")

    assert service.get("/latest/meta-data/instance-id").status == 200


def test_config_guest_defaults_apply_to_register(make_imds):
    server = make_imds(guest_defaults={"instance_type": "t1.micro"})
    server.register()

    assert server.get("/latest/meta-data/instance-type").text == "t1.micro"


@pytest.mark.parametrize(
    "config",
    [
        {"iam_role": "a/b"},
        {"ssh_key_name": "x=y"},
        {"region": "mars"},
        {"availability_zone": "eu-west-1a"},
        {"account_id": "12"},
    ],
    ids=["role", "key-name", "region", "zone", "account"],
)
def test_bad_config_values_are_refused(config):
    with pytest.raises(imds.ImdsError):
        imds.Settings.from_mapping(config)


def test_unknown_config_key_is_refused(tmp_path, capsys):
    config = tmp_path / "imds.json"
    config.write_text('{"regoin": "us-east-1"}')
    args = [
        "register",
        "--state-dir",
        str(tmp_path),
        "--config",
        str(config),
        "--name",
        "g",
        "--ip",
        "127.0.0.1",
        "--mac",
        "00:16:3e:00:00:01",
    ]

    assert imds.main(args) == 2
    assert "'regoin'" in capsys.readouterr().err


# ------------------------------------------------------------------------- IMDSv2


def test_token_put_returns_token_and_echoes_ttl(service):
    reply = service.request(
        "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
    )

    assert reply.status == 200
    assert reply.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert len(reply.text) >= 40


def test_tokens_are_distinct(service):
    assert service.token() != service.token()


@pytest.mark.parametrize(
    "ttl", [None, "0", "21601", "-5", "abc", "1.5", "", "\u00b2", "9" * 5000]
)
def test_token_put_with_missing_or_out_of_range_ttl_is_400(service, ttl):
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}

    assert service.request("PUT", "/latest/api/token", headers).status == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_token_ttl_bounds_are_accepted(service, ttl):
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": ttl}

    assert service.request("PUT", "/latest/api/token", headers).status == 200


def test_token_put_through_a_proxy_is_403(service):
    headers = {
        "X-aws-ec2-metadata-token-ttl-seconds": "60",
        "X-Forwarded-For": "203.0.113.9",
    }

    assert service.request("PUT", "/latest/api/token", headers).status == 403


def test_get_on_token_path_is_405(service):
    reply = service.get("/latest/api/token")

    assert reply.status == 405
    assert reply.headers["allow"] == "PUT"


def test_v2_get_with_token_answers_and_reports_remaining_ttl(service):
    token = service.token(ttl=120)
    reply = service.get("/latest/meta-data/instance-id", x_aws_ec2_metadata_token=token)

    assert reply.status == 200
    assert 0 < int(reply.headers["x-aws-ec2-metadata-token-ttl-seconds"]) <= 120


def test_invalid_token_is_401_even_when_tokens_are_optional(service):
    reply = service.get("/latest/meta-data/", x_aws_ec2_metadata_token="forged")

    assert reply.status == 401


def test_required_tokens_reject_get_without_token(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1", "--http-tokens", "required")

    assert server.get("/latest/meta-data/instance-id").status == 401
    assert server.get("/latest/user-data").status == 401
    token = server.token()
    reply = server.get("/latest/meta-data/instance-id", x_aws_ec2_metadata_token=token)
    assert reply.status == 200


def test_token_expires_after_its_ttl(service):
    token = service.token(ttl=5)
    store = service.server.service.tokens
    real_clock = store.clock
    store.clock = lambda: real_clock() + 5.5

    reply = service.get("/latest/meta-data/", x_aws_ec2_metadata_token=token)
    assert reply.status == 401


def test_token_is_bound_to_the_guest_that_asked(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1")
    server.register("g2", "127.0.0.2")
    token = server.token(source="127.0.0.1")

    reply = server.get(
        "/latest/meta-data/", source="127.0.0.2", x_aws_ec2_metadata_token=token
    )
    assert reply.status == 401


def test_token_store_stays_bounded_under_a_put_flood():
    store = imds.TokenStore(capacity=10)
    owner = ("g1", "i-0123456789abcdef0")
    tokens = [store.issue(owner, 60) for _ in range(25)]

    assert store.remaining(tokens[-1], owner) is not None
    assert store.remaining(tokens[0], owner) is None
    assert len(store._tokens) <= 10


def _ip_packets_from_port(sniffer: socket.socket, port: int, deadline: float):
    """(ttl, tcp payload) of IPv4/TCP packets from a loopback port, via AF_PACKET."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sniffer], [], [], 0.1)
        if not ready:
            continue
        frame = sniffer.recv(65535)
        ip = frame[14:]
        if len(ip) < 20 or ip[9] != socket.IPPROTO_TCP:
            continue
        ihl = (ip[0] & 0x0F) * 4
        tcp = ip[ihl:]
        if struct.unpack("!H", tcp[:2])[0] != port:
            continue
        yield ip[8], tcp[(tcp[12] >> 4) * 4 :]


@pytest.mark.skipif(os.geteuid() != 0, reason="sniffing loopback needs root")
def test_token_response_carries_the_hop_limit_as_ip_ttl(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1", "--hop-limit", "3")
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sniffer.bind(("lo", 0))
    try:
        token = server.token().encode()
        instance_id = server.get("/latest/meta-data/instance-id").body
        ttls: dict[str, int] = {}
        deadline = time.monotonic() + 5
        for ttl, payload in _ip_packets_from_port(sniffer, server.port, deadline):
            if token in payload:
                ttls["token"] = ttl
            elif instance_id in payload:
                ttls["get"] = ttl
            if len(ttls) == 2:
                break
    finally:
        sniffer.close()

    assert ttls == {"token": 3, "get": 64}


# ----------------------------------------------------------------------- user-data


def test_default_user_data_is_empty_json_object(service):
    reply = service.get("/latest/user-data")

    assert reply.status == 200
    assert reply.body == b"{}"
    assert reply.headers["content-type"] == "application/octet-stream"


def test_no_user_data_gives_404_and_is_not_listed(make_imds):
    server = make_imds()
    server.register("g1", "127.0.0.1", "--no-user-data")

    assert server.get("/latest/user-data").status == 404
    assert "user-data" not in server.get("/latest/").text.split("\n")


def test_user_data_bytes_are_served_unchanged(make_imds, tmp_path, caplog):
    server = make_imds()
    data = bytes(range(256)) * 4
    path = tmp_path / "user-data.bin"
    path.write_bytes(data)
    server.register("g1", "127.0.0.1", "--user-data-file", str(path))

    assert server.get("/latest/user-data").body == data
    assert server.get("/2009-04-04/user-data").body == data


def test_user_data_that_unik_cannot_parse_warns_but_registers(
    make_imds, tmp_path, caplog
):
    server = make_imds()
    path = tmp_path / "script.sh"
    path.write_text("#!/bin/sh\necho hi\n")

    assert server.register("g1", "127.0.0.1", "--user-data-file", str(path)) == 0
    assert "UniK" in caplog.text and "is not JSON" in caplog.text


def test_user_data_as_json_string_map_registers_without_warning(
    make_imds, tmp_path, caplog
):
    server = make_imds()
    path = tmp_path / "env.json"
    path.write_text('{"PORT": "8080"}')

    assert server.register("g1", "127.0.0.1", "--user-data-file", str(path)) == 0
    assert "UniK" not in caplog.text


def test_user_data_of_exactly_16_kib_is_accepted(make_imds, tmp_path):
    server = make_imds()
    path = tmp_path / "big"
    path.write_bytes(b"x" * 16384)

    assert server.register("g1", "127.0.0.1", "--user-data-file", str(path)) == 0
    assert len(server.get("/latest/user-data").body) == 16384


def test_user_data_over_16_kib_is_refused_with_one_sentence(
    make_imds, tmp_path, capsys
):
    server = make_imds()
    path = tmp_path / "too-big"
    path.write_bytes(b"x" * 16385)

    assert server.register("g1", "127.0.0.1", "--user-data-file", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert "16384" in err and "\n" not in err
    assert not (server.state_dir / "guests" / "g1.json").exists()


def test_user_data_from_stdin(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "c.json"
    config.write_text("{}")
    result = subprocess.run(
        [
            sys.executable,
            str(IMDS_FILE),
            "register",
            "--state-dir",
            str(state),
            "--config",
            str(config),
            "--name",
            "g1",
            "--ip",
            "127.0.0.1",
            "--mac",
            "00:16:3e:00:00:01",
            "--user-data-file",
            "-",
        ],
        input=b'{"A": "b"}',
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    saved = json.loads((state / "guests" / "g1.json").read_text())
    assert saved["user_data_b64"] == "eyJBIjogImIifQ=="


# -------------------------------------------------------------------------- events


def test_spot_interruption_appears_and_clears(service):
    assert service.cli("event", "--name", "g1", "--spot-interruption", "stop") == 0

    action = service.get("/latest/meta-data/spot/instance-action").json()
    assert action["action"] == "stop"
    datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ")
    assert "spot/" in service.get("/latest/meta-data/").text.split("\n")
    assert service.get("/latest/meta-data/instance-life-cycle").text == "spot"

    assert service.cli("event", "--name", "g1", "--clear") == 0
    assert service.get("/latest/meta-data/spot/instance-action").status == 404


def test_spot_termination_sets_termination_time(service):
    service.cli("event", "--name", "g1", "--spot-interruption", "terminate")

    action = service.get("/latest/meta-data/spot/instance-action").json()
    assert service.get("/latest/meta-data/spot/termination-time").text == action["time"]


def test_scheduled_event_appears_in_maintenance_schedule(service):
    assert (
        service.cli("event", "--name", "g1", "--scheduled-event", "system-reboot") == 0
    )

    events = service.get("/latest/meta-data/events/maintenance/scheduled").json()
    assert len(events) == 1
    assert events[0]["Code"] == "system-reboot"
    assert events[0]["State"] == "active"
    assert events[0]["EventId"].startswith("instance-event-")
    assert set(events[0]) == {
        "Code",
        "Description",
        "EventId",
        "NotAfter",
        "NotBefore",
        "State",
    }


def test_unknown_scheduled_event_code_is_refused(service, capsys):
    assert service.cli("event", "--name", "g1", "--scheduled-event", "reboot") == 2
    assert "system-reboot" in capsys.readouterr().err


def test_event_for_unregistered_guest_is_refused(service, capsys):
    assert service.cli("event", "--name", "nobody", "--clear") == 2
    assert "not registered" in capsys.readouterr().err


# -------------------------------------------------------------------------- import


def test_import_overrides_leaves_but_keeps_what_the_emulator_owns(
    service, tmp_path, capsys
):
    tree = {
        "ami-id": "ami-0fedcba9876543210",
        "instance-type": "t1.micro",
        "mac": "0e:00:00:00:00:01",
        "local-ipv4": "10.0.0.5",
        "system": "xen",
        "placement": {"availability-zone-id": "use1-az4"},
        "network": {
            "interfaces": {
                "macs": {
                    "0e:00:00:00:00:01": {
                        "mac": "0e:00:00:00:00:01",
                        "local-ipv4s": "10.0.0.5",
                        "vpc-id": "vpc-0aaaaaaaaaaaaaaaa",
                        "device-number": "0",
                    }
                }
            }
        },
    }
    capture = tmp_path / "capture.json"
    capture.write_text(json.dumps(tree))
    meta = "/latest/meta-data"

    assert service.cli("import", "--name", "g1", str(capture)) == 0
    kept = capsys.readouterr().out
    assert "kept mac" in kept and "kept local-ipv4" in kept
    assert service.get(f"{meta}/ami-id").text == "ami-0fedcba9876543210"
    assert service.get(f"{meta}/system").text == "xen"
    assert service.get(f"{meta}/placement/availability-zone-id").text == "use1-az4"
    assert service.get(f"{meta}/placement/region").text == "us-east-1"
    assert service.get(f"{meta}/mac").text == "00:16:3e:00:00:01"
    assert service.get(f"{meta}/local-ipv4").text == "127.0.0.1"
    ours = f"{meta}/network/interfaces/macs/00:16:3e:00:00:01"
    assert service.get(f"{ours}/vpc-id").text == "vpc-0aaaaaaaaaaaaaaaa"
    assert service.get(f"{ours}/local-ipv4s").text == "127.0.0.1"
    document = service.get("/latest/dynamic/instance-identity/document").json()
    assert document["imageId"] == "ami-0fedcba9876543210"
    assert document["instanceType"] == "t1.micro"
    assert document["privateIp"] == "127.0.0.1"


@pytest.mark.parametrize(
    "tree",
    [["not", "an", "object"], {"ami-id": 5}, {"a/b": "x"}, {"events": None}],
    ids=["list", "number", "slash", "null"],
)
def test_import_refuses_malformed_trees(service, tmp_path, tree, capsys):
    capture = tmp_path / "bad.json"
    capture.write_text(json.dumps(tree))

    assert service.cli("import", "--name", "g1", str(capture)) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_capture_script_round_trips_into_import(make_imds, tmp_path):
    server = make_imds(region="eu-west-1")
    server.register("source", "127.0.0.1", "--instance-type", "t1.micro")
    server.register("replay", "127.0.0.2")
    result = subprocess.run(
        [
            sys.executable,
            str(CAPTURE_SCRIPT),
            "--endpoint",
            f"http://127.0.0.1:{server.port}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    tree = json.loads(result.stdout)
    capture = tmp_path / "capture.json"
    capture.write_text(result.stdout.decode())

    assert "security-credentials" not in tree.get("iam", {})
    assert tree["public-keys"]["0=pvlab"]["openssh-key"] == SSH_KEY
    assert server.cli("import", "--name", "replay", str(capture)) == 0
    replayed = server.get("/latest/meta-data/instance-type", source="127.0.0.2")
    assert replayed.text == "t1.micro"
    assert server.get("/latest/meta-data/mac", source="127.0.0.2").text == (
        "00:16:3e:00:00:02"
    )


# ------------------------------------------------------------------- observability


def test_request_log_records_method_path_status_latency_never_token(service):
    token = service.token()
    service.get("/latest/meta-data/instance-id", x_aws_ec2_metadata_token=token)
    service.get("/latest/meta-data/nope")

    log_text = (service.state_dir / "logs" / "g1.jsonl").read_text()
    assert token not in log_text
    entries = service.log_entries("g1")
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("PUT", "/latest/api/token", 200),
        ("GET", "/latest/meta-data/instance-id", 200),
        ("GET", "/latest/meta-data/nope", 404),
    ]
    assert all(e["latency_ms"] >= 0 for e in entries)
    assert entries[1]["imds"] == "v2" and entries[2]["imds"] == "v1"


def test_log_command_prints_the_guest_log(service, capsys):
    service.get("/latest/meta-data/ami-id")

    assert service.cli("log", "--name", "g1") == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["path"] == "/latest/meta-data/ami-id"


def test_log_of_a_guest_never_heard_from_is_an_error(service, capsys):
    assert service.cli("log", "--name", "silent") == 2
    assert "silent" in capsys.readouterr().err


def test_log_follow_prints_new_requests(service):
    follower = subprocess.Popen(
        [
            sys.executable,
            str(IMDS_FILE),
            "log",
            "--state-dir",
            str(service.state_dir),
            "--name",
            "g1",
            "--follow",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        service.get("/latest/meta-data/hostname")
        ready, _, _ = select.select([follower.stdout], [], [], 10)
        assert ready, "log --follow printed nothing"
        entry = json.loads(follower.stdout.readline())
        assert entry["path"] == "/latest/meta-data/hostname"
    finally:
        follower.terminate()
        follower.wait(timeout=5)


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /latest/meta-data/\r\n\r\n", 400),
        (b"GET latest HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"FOO /latest/meta-data/ HTTP/1.1\r\n\r\n", 405),
        (b"DELETE /latest/meta-data/ HTTP/1.1\r\n\r\n", 405),
        (b"PUT /latest/meta-data/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X-Flood: y\r\n" * 200 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", 431),
    ],
    ids=[
        "garbage",
        "tls",
        "http09",
        "relative",
        "header",
        "length",
        "length-superscript",
        "http2",
        "unknown-method",
        "delete",
        "put",
        "huge-path",
        "header-flood",
        "huge-header",
    ],
)
def test_bad_requests_get_a_status_and_the_service_survives(
    service, request_bytes, status
):
    assert status_of(service.raw(request_bytes)) == status
    assert service.get("/latest/meta-data/instance-id").status == 200


def test_client_closing_mid_request_does_not_hurt_the_service(service):
    for partial in (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x", b"GE", b""):
        with socket.create_connection(("127.0.0.1", service.port)) as s:
            s.sendall(partial)

    assert service.get("/latest/meta-data/instance-id").status == 200


def test_request_with_body_keeps_the_connection_in_step(service):
    reply = service.raw(
        b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 9\r\n"
        b"Content-Length: 5\r\n\r\nhello"
        b"GET /latest/meta-data/ami-id HTTP/1.1\r\nConnection: close\r\n\r\n",
        responses=2,
    )

    assert reply.count(b"HTTP/1.1 200 OK") == 2


def test_trickling_client_is_cut_off_at_the_request_timeout(make_imds):
    server = make_imds(imds.Limits(workers=2, request_timeout=0.6))
    server.register()
    started = time.monotonic()
    closed = False
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\n")
        for _ in range(40):  # one header byte every 0.1 s, at most 4 s
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            ready, _, _ = select.select([s], [], [], 0.1)
            if ready and s.recv(1024) == b"":
                closed = True
                break

    assert closed
    assert time.monotonic() - started < 2.0


def test_flood_of_idle_connections_is_bounded_and_gets_503(make_imds):
    limits = imds.Limits(workers=2, queue_size=2, request_timeout=2.0)
    server = make_imds(limits)
    server.register()
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    try:
        time.sleep(0.3)  # let the server accept them: 2 in workers, 2 queued
        busy = server.raw(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n")
        assert status_of(busy) == 503
        refused = 0
        for sock in idle:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                refused += sock.recv(100).startswith(b"HTTP/1.1 503")
        assert refused == 6  # all but workers + queue
        assert threading.active_count() == threads_before
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while server.get("/latest/meta-data/instance-id").status != 200:
        assert time.monotonic() < deadline, "service did not recover"
        time.sleep(0.1)


def test_concurrent_guests_are_all_answered(make_imds):
    server = make_imds()
    for n in range(1, 5):
        server.register(f"g{n}", f"127.0.0.{n}")
    failures: list[str] = []

    def ask(n: int) -> None:
        for _ in range(25):
            reply = server.get("/latest/meta-data/local-ipv4", source=f"127.0.0.{n}")
            if reply.text != f"127.0.0.{n}":
                failures.append(f"{n}: {reply.status} {reply.text}")

    workers = [threading.Thread(target=ask, args=(n,)) for n in range(1, 5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)

    assert failures == []


# ---------------------------------------------------------------------- standalone


def test_module_imports_only_the_standard_library():
    tree = ast.parse(IMDS_FILE.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative import"
            modules.add(node.module.split(".")[0])

    assert modules - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_module_runs_as_a_plain_script_in_isolated_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-I", str(IMDS_FILE), "serve", "--help"],
        capture_output=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert b"--state-dir" in result.stdout


# ------------------------------------------------------------------ control socket


@pytest.fixture
def control(make_imds):
    """A metadata service plus its control socket (in a short directory: Unix
    socket paths are limited to about 100 bytes)."""
    import tempfile

    server = make_imds()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pvlab-ctl-") as short:
        path = Path(short) / "control.sock"
        settings = imds.Settings.from_mapping({"ssh_public_key": SSH_KEY})
        ctl = imds.ControlServer(path, server.state_dir, settings)
        thread = threading.Thread(
            target=ctl.serve_forever, kwargs={"poll_interval": 0.05}
        )
        thread.start()
        yield server, ctl
        ctl.shutdown()
        ctl.server_close()
        thread.join(timeout=5)


def ask_control(path: Path, method: str, target: str, body: bytes = b"") -> tuple:
    """One HTTP request over the Unix socket, as curl --unix-socket sends it."""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: imds\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, text = data.partition(b"\r\n\r\n")
    return status_of(head), text.decode()


G2 = "/guests/g2?mac=00:16:3e:00:00:02&ip=127.0.0.2"


def test_control_put_registers_with_the_body_as_user_data(control):
    server, ctl = control

    status, text = ask_control(ctl.path, "PUT", G2, b'{"K": "v"}')

    assert status == 200
    assert text.strip().splitlines()[-1].startswith("registered guest g2 as i-")
    assert server.get("/latest/user-data", source="127.0.0.2").body == b'{"K": "v"}'


def test_control_put_with_no_user_data_serves_404(control):
    server, ctl = control

    assert ask_control(ctl.path, "PUT", G2 + "&no-user-data=1")[0] == 200
    assert server.get("/latest/user-data", source="127.0.0.2").status == 404


def test_control_put_warns_about_user_data_unik_cannot_parse(control):
    status, text = ask_control(control[1].path, "PUT", G2, b"#!/bin/sh\n")

    assert status == 200
    assert text.startswith("warning: the user-data of g2 is not JSON")


@pytest.mark.parametrize(
    "target, body, says",
    [
        ("/guests/g2?mac=00:16:3e:00:00:01&ip=127.0.0.2", b"{}", "belongs to guest g1"),
        ("/guests/g2?mac=00:16:3e:00:00:02&ip=127.0.0.1", b"{}", "belongs to guest g1"),
        ("/guests/g2?ip=127.0.0.2", b"{}", "gives no mac"),
        (G2 + "&colour=red", b"{}", "unknown option 'colour'"),
        (G2 + "&hop-limit=x", b"{}", "is not a number"),
        (G2 + "&hop-limit=65", b"{}", "hop"),
        ("/guests/..?mac=00:16:3e:00:00:02&ip=127.0.0.2", b"{}", "name"),
        (G2, b"x" * (imds.USER_DATA_LIMIT + 1), "16 KiB"),
    ],
    ids=["same-mac", "same-ip", "no-mac", "unknown", "hop-nan", "hop-range",
         "bad-name", "too-large"],
)
def test_control_refusals_are_400_with_one_sentence(control, target, body, says):
    server, ctl = control
    server.register("g1", "127.0.0.1")

    status, text = ask_control(ctl.path, "PUT", target, body)

    assert status == 400
    assert says in text and text.count("\n") == 1
    assert not (server.state_dir / "guests" / "g2.json").exists()


def test_control_delete_forgets_and_is_idempotent(control):
    server, ctl = control
    server.register("g1", "127.0.0.1")

    assert ask_control(ctl.path, "DELETE", "/guests/g1") == (
        200, "unregistered guest g1\n"
    )
    assert server.get("/latest/meta-data/").status == 404
    assert ask_control(ctl.path, "DELETE", "/guests/g1")[0] == 200


def test_control_other_paths_and_methods_are_refused(control):
    ctl = control[1]

    assert ask_control(ctl.path, "GET", "/guests/g1")[0] == 405
    assert ask_control(ctl.path, "PUT", "/latest/meta-data")[0] == 404


def test_control_socket_is_root_only_replaces_a_stale_one_and_goes_away(tmp_path):
    import tempfile

    settings = imds.Settings.from_mapping({})
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pvlab-ctl-") as short:
        path = Path(short) / "control.sock"
        path.write_text("left by a killed service")
        ctl = imds.ControlServer(path, tmp_path, settings)

        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        ctl.server_close()
        assert not path.exists()


def test_a_guest_booted_again_under_its_name_gets_its_requests_logged_afresh(service):
    assert service.get("/latest/meta-data/").status == 200
    log_path = service.state_dir / "logs" / "g1.jsonl"
    log_path.unlink()  # what a boot of a new g1 does before registering it

    assert service.get("/latest/meta-data/instance-id").status == 200
    entries = service.log_entries("g1")
    assert len(entries) == 1 and entries[0]["path"] == "/latest/meta-data/instance-id"
