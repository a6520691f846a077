#!/usr/bin/env python3
"""Capture a real EC2 instance's metadata tree as JSON for `imds.py import`.

Run it ON the instance (standard library only): it walks /latest/meta-data/ with an
IMDSv2 token and prints one JSON object, directories as objects and leaves as
strings. Role credentials and identity credentials are never captured.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

DEFAULT_ENDPOINT = "http://169.254.169.254"
# Live secrets: replaying them elsewhere would leak working keys.
SKIPPED = ("iam/security-credentials/", "identity-credentials/")
MAX_NODES = 5000
MAX_DEPTH = 16


class Capture:
    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.nodes = 0
        self.token = self._token()

    def _token(self) -> str:
        request = urllib.request.Request(
            f"{self.endpoint}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode("ascii")

    def get(self, path: str) -> str | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SystemExit(f"imds-capture: more than {MAX_NODES} entries; stopping")
        request = urllib.request.Request(
            f"{self.endpoint}/latest/meta-data/{path}",
            headers={"X-aws-ec2-metadata-token": self.token},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None  # listed but not readable, as some leaves are
            raise

    def walk(self, path: str = "", depth: int = 0) -> dict[str, object]:
        tree: dict[str, object] = {}
        body = self.get(path)
        if body is None or depth > MAX_DEPTH:
            return tree
        for entry in filter(None, body.split("\n")):
            if "=" in entry and path == "public-keys/":
                # Listed as "0=key-name", read as public-keys/0/.
                tree[entry] = self.walk(f"{path}{entry.split('=', 1)[0]}/", depth + 1)
            elif entry.endswith("/"):
                child = f"{path}{entry}"
                if child not in SKIPPED:
                    tree[entry[:-1]] = self.walk(child, depth + 1)
            else:
                value = self.get(f"{path}{entry}")
                if value is not None:
                    tree[entry] = value
        return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"metadata service to walk (default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds a request")
    args = parser.parse_args(argv)
    try:
        tree = Capture(args.endpoint, args.timeout).walk()
    except (OSError, urllib.error.URLError) as exc:
        print(
            f"imds-capture: cannot read {args.endpoint} ({exc}); run this on an EC2 "
            "instance whose metadata service is enabled",
            file=sys.stderr,
        )
        return 1
    json.dump(tree, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
