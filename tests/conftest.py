"""Shared fixtures: real PostgreSQL, Redis and a SeaweedFS S3 server on 127.0.0.1, and the
offline checkpoints (built on first use into the capworks cache).

A missing server skips its tests locally and fails them in CI (CAPWORKS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist each worker takes a Redis database of its own (15, 14, ...), before any test
# module reads CAPWORKS_TEST_REDIS_DB: kombu keeps one `unacked` index per database, and tests
# running side by side must not restore each other's messages.
if "PYTEST_XDIST_WORKER" in os.environ and "CAPWORKS_TEST_REDIS_DB" not in os.environ:
    _worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw") or 0)
    os.environ["CAPWORKS_TEST_REDIS_DB"] = str(15 - _worker)

# Without AWS credentials botocore's chain asks the cloud metadata address (169.254.169.254):
# no test may send a packet off loopback, so the suite (and every process it starts) skips that
# step; tests/test_no_packet_off_loopback.py runs without it, under a connect() spy.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from capworks.seaweed import SeaweedServer, s3_client  # noqa: F401 - s3_client is for the tests

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def require_service(name: str, reason: str) -> None:
    """Skip locally, fail in CI, when a real server the test needs is missing."""
    if os.environ.get("CAPWORKS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required in CI: {reason}")
    pytest.skip(f"{name} unavailable: {reason}")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    from capworks.schema.settings import get_settings

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
    from capworks.schema.checkpoint import read_config
    from capworks.workers.engine import OfaEngine

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
    from pipeline_support import own_queue

    from capworks.schema.db import connect

    connect(pg_url).dispose()  # migrated up front, so a test can read before a worker starts
    with own_queue(pg_url, tmp_path, s3_endpoint) as p:
        yield p


def seaweed_server(data: Path) -> SeaweedServer:
    """A scratch SeaweedFS server (not started), or a skip/CI failure without the binary."""
    try:
        return SeaweedServer(data)
    except FileNotFoundError as exc:
        require_service("SeaweedFS", str(exc))
        raise


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 server on 127.0.0.1 shared by the session, stopped at its end."""
    server = seaweed_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def own_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server of one test's own, which the test may stop and restart."""
    server = seaweed_server(tmp_path_factory.mktemp("seaweedfs-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir: Path) -> Iterator[object]:
    from capworks.schema.checkpoint import read_config
    from capworks.workers.engine import OfaEngine

    engine = OfaEngine.load(read_config(tiny_dir, "tiny-random"), device="cpu", batch_size=4)
    yield engine
    engine.close()


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


def postgres_cluster(action: str) -> None:
    """`pg_ctlcluster` on the local PostgreSQL: "stop", "start" or "restart"."""
    clusters = sorted(Path("/etc/postgresql").glob("*/main"))
    if not clusters:
        require_service("pg_ctlcluster", "no local PostgreSQL cluster to stop and start")
    version = clusters[-1].parent.name
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 or "already running" in result.stdout, result.stderr


@pytest.fixture()
def postgres_control() -> Iterator[None]:
    """Lets a test stop the local PostgreSQL; it is running again whatever the test does."""
    try:
        yield
    finally:
        postgres_cluster("start")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`serial`: the fault suite (its timings compare runs on a quiet machine) and every test
    that stops PostgreSQL (which the others share); scripts/test.sh runs them alone. `farm`:
    the test farm's, whose hosts run services of their own, so they run beside those."""
    for item in items:
        if "faults" in item.path.parts or "postgres_control" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serial)
        if "farm" in item.path.parts:
            item.add_marker(pytest.mark.farm)
