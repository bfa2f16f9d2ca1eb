"""Not one packet off loopback: a worker and the CLI commands, run with no AWS settings at all
(and without AWS_EC2_METADATA_DISABLED), connect to nothing but loopback. Every Python process
they start loads tests/netspy/sitecustomize.py, which logs and refuses any connect() off
loopback (botocore's credential chain probing 169.254.169.254 was one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import png_bytes
from pipeline_support import Pipeline, captions, own_queue, wait_until

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.db import connect
from capworks.schema.errors import StorageError
from capworks.schema.settings import Settings
from capworks.schema.storage import LazyS3Client, make_s3_client
from capworks.schema.uris import ImageRef
from capworks.workers.fetch import StoreFetcher

SPY = Path(__file__).resolve().parent / "netspy"


def spied_env(env: dict[str, str], log: Path, tmp: Path) -> dict[str, str]:
    """`env` without any AWS or S3 setting, under the connect spy."""
    clean = {k: v for k, v in env.items() if not k.startswith(("AWS_", "CAPWORKS_S3_", "BOTO"))}
    return {
        **clean,
        # No credentials file either: botocore falls through to the instance metadata.
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials"),
        "AWS_CONFIG_FILE": str(tmp / "no-config"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SPY), env.get("PYTHONPATH")])),
        "CAPWORKS_TEST_CONNECT_LOG": str(log),
    }


class SpiedPipeline(Pipeline):
    """A pipeline whose workers and commands run with no AWS settings, under the spy."""

    @property
    def env(self) -> dict[str, str]:
        return spied_env(super().env, self.tmp / "connects.log", self.tmp)


def off_loopback(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_the_spy_sees_and_refuses_a_connect_off_loopback(tmp_path: Path) -> None:
    log = tmp_path / "connects.log"
    probe = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('169.254.169.254', 80), timeout=1)\n"
        "except ConnectionRefusedError as exc:\n"
        "    print(exc)\n"
        "socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    )
    env = spied_env(dict(os.environ), log, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert "connect spy" in result.stdout
    assert "ConnectionRefusedError" in result.stderr  # loopback passed through to the real port
    assert "169.254.169.254" in off_loopback(log)
    assert "127.0.0.1" not in off_loopback(log)


@pytest.mark.slow
def test_a_worker_and_the_cli_without_aws_settings_connect_only_to_loopback(
    pg_url: str, shapes_dir: Path, tmp_path: Path
) -> None:
    connect(pg_url).dispose()  # migrated before the worker starts
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (img, _) in enumerate(sample_scenes(3, 7)):
        (folder / f"scene {i}.png").write_bytes(png_bytes(img))
    with own_queue(pg_url, tmp_path) as base:
        p = SpiedPipeline(base.db_url, base.s3_endpoint, tmp_path, queue=base.queue)
        assert "AWS_ACCESS_KEY_ID" not in p.env and "AWS_EC2_METADATA_DISABLED" not in p.env
        log = tmp_path / "connects.log"
        try:
            worker = p.start_worker(concurrency=1)
            enqueued = p.cli("enqueue", str(folder), "--no-progress")
            assert enqueued.returncode == 0, enqueued.stderr

            def captioned() -> bool:
                assert worker.poll() is None, f"the worker died:\n{p.log_text()[-4000:]}"
                return len(captions(pg_url)) == 3

            wait_until(captioned, 240, "the folder's captions", lambda: p.log_text()[-4000:])
            one_shot = p.cli(
                "caption", str(folder), "--model", "shapes", "--db", f"sqlite:///{tmp_path}/o.db"
            )
            assert one_shot.returncode == 0, one_shot.stderr
            status = p.cli("status")
            assert status.returncode == 0, status.stderr
        finally:
            p.stop_workers()
        assert off_loopback(log) == "", f"connects off loopback:\n{off_loopback(log)}"


def test_the_s3_client_is_built_on_the_first_s3_reference_only(tmp_path: Path) -> None:
    built: list[Settings] = []

    def make(settings: Settings) -> object:
        built.append(settings)
        return make_s3_client(settings)

    settings = Settings(file_roots=(tmp_path,), s3_endpoint_url="http://127.0.0.1:9")
    lazy = LazyS3Client(settings, make)
    fetcher = StoreFetcher.from_settings(settings, lazy)
    (tmp_path / "a.png").write_bytes(b"png")
    assert fetcher.fetch(ImageRef(uri=str(tmp_path / "a.png"))) == b"png"
    assert not lazy.built and built == []
    with pytest.raises(StorageError):  # nothing listens there: built, then unreachable
        fetcher.fetch(ImageRef(uri="s3://bucket/a.png"))
    assert lazy.built and built == [settings]
