"""An S3-compatible server on 127.0.0.1 for the tests (moto in server mode), and the Snakemake options
that point the S3 storage plugin at it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = SECRET_KEY = "cellarium-test"
#: no credential files, no instance metadata lookups: the only address boto3 talks to is the server's
AWS_ENV = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    def __init__(self, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV},
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self):
        import boto3

        os.environ.update(AWS_ENV)
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def snakemake_options(self, bucket: str, local_copies: Path) -> list[str]:
        """Every path of the workflow in ``s3://bucket/``, staged through ``local_copies``."""
        return ["--default-storage-provider", "s3", "--default-storage-prefix", f"s3://{bucket}",
                "--storage-s3-endpoint-url", self.url, "--storage-s3-access-key", ACCESS_KEY,
                "--storage-s3-secret-key", SECRET_KEY, "--local-storage-prefix", str(local_copies)]
