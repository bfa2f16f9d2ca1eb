"""A job says which caption identity (model, revision, generation settings) it was made for: the
producer computes it from `configuration.json` alone, and a worker serving another identity
dead-letters the job as `wrong_model` instead of captioning it under its own."""

from __future__ import annotations

import hashlib
import json
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
from capworks.schema.checkpoint import (
    file_sha256,
    read_config,
    resolve_checkpoint,
    resolve_identity,
)
from capworks.schema.errors import CheckpointError
from capworks.schema.jobs import Job
from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Failure
from capworks.schema.uris import ImageRef
from capworks.workers.runtime import Runtime
from capworks.workers.tasks import handle_message

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"


def require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))


def record_weights_hash(folder: Path) -> None:
    """`sha256sum pytorch_model.bin > weights.sha256`, as an operator records it."""
    digest = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    (folder / "weights.sha256").write_text(f"{digest}  pytorch_model.bin\n")


def producer_copy(tiny_dir: Path, where: Path) -> Path:
    """What a producer host holds of a local checkpoint: configuration.json and the weights'
    recorded hash, no weights."""
    where.mkdir()
    shutil.copy(tiny_dir / "configuration.json", where)
    full = where.parent / f"{where.name}-full"
    shutil.copytree(tiny_dir, full)
    record_weights_hash(full)
    shutil.copy(full / "weights.sha256", where)
    return where


def test_the_identity_needs_only_configuration_json_and_the_recorded_weights_hash(
    tiny_dir: Path, tmp_path: Path
) -> None:
    only_config = producer_copy(tiny_dir, tmp_path / "producer-copy")
    with pytest.raises(CheckpointError, match="missing"):
        resolve_checkpoint(str(only_config), None, tmp_path)
    model_id, revision, settings_hash = resolve_identity(str(only_config), "v2", tmp_path)
    worker_side = resolve_checkpoint(str(tmp_path / "producer-copy-full"), "v2", tmp_path)
    assert (model_id, revision, settings_hash) == worker_side.identity
    assert model_id.startswith("local:") and str(tmp_path) not in model_id
    assert settings_hash == read_config(tiny_dir, "tiny-random").identity[2]
    (only_config / "weights.sha256").unlink()
    with pytest.raises(CheckpointError, match="weights.sha256"):
        resolve_identity(str(only_config), "v2", tmp_path)
    assert resolve_identity("tiny-random", None, tiny_dir.parent) == (
        read_config(tiny_dir, "tiny-random").identity
    )


def test_capworks_enqueue_runs_on_a_host_without_the_weights(
    tiny_dir: Path, tmp_path: Path
) -> None:
    require_redis()
    only_config = producer_copy(tiny_dir, tmp_path / "model")
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
        letter_model = conn.execute(
            select(Failure.model_id, Failure.revision, Failure.settings_hash)
        ).one()
    assert [code for code, _ in failed] == ["wrong_model"]
    assert "job is for shapes" in failed[0][1] and "serves tiny-random" in failed[0][1]
    assert captioned == ["tiny-random"]
    # The letter names the model the job was made for, not the worker's.
    assert tuple(letter_model) == ("shapes", "", "0000")


def test_one_checkpoint_mounted_at_two_paths_has_one_identity(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # Two hosts mount the same checkpoint at different paths: the producer of one and the
    # workers of the other must agree, or every job is dead-lettered as wrong_model.
    here = tmp_path / "host-a" / "models" / "ofa"
    there = tmp_path / "host-b" / "mnt" / "captioner"
    shutil.copytree(tiny_dir, here)
    shutil.copytree(tiny_dir, there)
    cache = tmp_path / "cache"
    a = resolve_checkpoint(str(here), None, cache)
    b = resolve_checkpoint(str(there), None, cache)
    assert a.identity == b.identity == resolve_identity(str(there), None, cache)
    assert str(here) not in a.model_id and a.model_dir == here.resolve()
    # Other weights, or other task settings, are another model.
    (there / "pytorch_model.bin").write_bytes(b"other weights")
    assert resolve_checkpoint(str(there), None, cache).identity != a.identity
    configuration = json.loads((here / "configuration.json").read_text())
    configuration["model"]["prompt"] = " what is in the picture?"
    (here / "configuration.json").write_text(json.dumps(configuration))
    assert resolve_checkpoint(str(here), None, cache).model_id != a.model_id


def test_a_folders_weights_are_hashed_once_per_file_version(tmp_path: Path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"w" * 1000)
    cache = tmp_path / "cache"
    first = file_sha256(weights, cache)
    assert first == hashlib.sha256(b"w" * 1000).hexdigest() and len(list(cache.iterdir())) == 1
    next(cache.iterdir()).write_text("f" * 64)  # a cached answer is used, not recomputed
    assert file_sha256(weights, cache) == "f" * 64
    weights.write_bytes(b"v" * 1001)  # a new file version (size, mtime) is hashed again
    assert file_sha256(weights, cache) == hashlib.sha256(b"v" * 1001).hexdigest()
