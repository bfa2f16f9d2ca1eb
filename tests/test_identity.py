"""A job says which caption identity (model, revision, generation settings) it was made for: the
producer computes it from `configuration.json` alone, and a worker serving another identity
dead-letters the job as `wrong_model` instead of captioning it under its own."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import redis
from conftest import png_bytes, require_service, run_cli
from sqlalchemy import create_engine, select
from test_image_path import MemoryFetcher

from capworks.checkpoints.shapes_world import sample_scenes
from schema.checkpoint import read_config, resolve_checkpoint, resolve_identity
from schema.errors import CheckpointError
from schema.jobs import Job
from schema.settings import Settings
from schema.tables import Caption, Failure
from schema.uris import ImageRef
from workers.runtime import Runtime
from workers.tasks import handle_message

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"


def require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))


def test_the_identity_needs_only_configuration_json(tiny_dir: Path, tmp_path: Path) -> None:
    only_config = tmp_path / "producer-copy"
    only_config.mkdir()
    shutil.copy(tiny_dir / "configuration.json", only_config)
    with pytest.raises(CheckpointError, match="missing"):
        resolve_checkpoint(str(only_config), None, tmp_path)
    model_id, revision, settings_hash = resolve_identity(str(only_config), "v2", tmp_path)
    assert (model_id, revision) == (str(only_config), "v2")
    assert settings_hash == read_config(tiny_dir, "tiny-random").identity[2]
    assert resolve_identity("tiny-random", None, tiny_dir.parent) == (
        read_config(tiny_dir, "tiny-random").identity
    )


def test_capworks_enqueue_runs_on_a_host_without_the_weights(
    tiny_dir: Path, tmp_path: Path
) -> None:
    require_redis()
    only_config = tmp_path / "model"
    only_config.mkdir()
    shutil.copy(tiny_dir / "configuration.json", only_config)
    images = tmp_path / "images"
    images.mkdir()
    png = png_bytes(sample_scenes(1, seed=81)[0][0])
    (images / "a.png").write_bytes(png)
    queue = f"capworks-identity-{uuid.uuid4().hex[:8]}"
    env = {
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": queue,
        "CAPWORKS_ALLOW_EVICTING_BROKER": "1",
    }
    db = f"sqlite:///{tmp_path / 'producer.db'}"
    args = ("enqueue", str(images), "--model", str(only_config), "--db", db, "--no-progress")
    try:
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert redis.Redis.from_url(REDIS_URL).llen(queue) == 1
    finally:
        redis.Redis.from_url(REDIS_URL).delete(queue)


def test_a_job_for_another_model_is_dead_lettered_as_wrong_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    require_redis()
    db_url = f"sqlite:///{tmp_path / 'identity.db'}"
    objects = {
        f"s3://mem/{i}.png": png_bytes(img) for i, (img, _) in enumerate(sample_scenes(2, 82))
    }
    settings = Settings(
        model="tiny-random",
        cache_dir=tiny_dir.parent.parent,
        device="cpu",
        database_url=db_url,
        broker_url=REDIS_URL,
    )
    rt = Runtime.build(settings, fetcher=MemoryFetcher(objects))
    try:
        other = Job.new([ImageRef("s3://mem/0.png")], model=("shapes", "", "0000"))
        mine = Job.new([ImageRef("s3://mem/1.png")], model=rt.config.identity)
        assert handle_message(rt, (other.to_wire(),), {}, "t1") == {"dead_lettered": 1}
        assert handle_message(rt, (mine.to_wire(),), {}, "t2")["captioned"] == 1
    finally:
        rt.close()
    with create_engine(db_url).connect() as conn:
        failed = conn.execute(select(Failure.code, Failure.message)).all()
        captioned = conn.execute(select(Caption.model_id)).scalars().all()
    assert [code for code, _ in failed] == ["wrong_model"]
    assert "job is for shapes" in failed[0][1] and "serves tiny-random" in failed[0][1]
    assert captioned == ["tiny-random"]
