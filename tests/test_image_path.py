"""The one image path (fetch -> decode -> batcher) on the real tiny-random engine, with alternative
parts plugged in through its seams: `MemoryFetcher` is a real in-memory object store (a dict),
not a stand-in for one; `CountingCaptioner` is the real engine with a counter."""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import png_bytes
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.errors import Code, StorageError
from capworks.schema.jobs import Job
from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Failure
from capworks.schema.uris import ImageRef
from capworks.workers.batcher import Batcher
from capworks.workers.engine import Caption as EngineCaption
from capworks.workers.engine import OfaEngine
from capworks.workers.imagepath import ImagePath
from capworks.workers.job import run_job
from capworks.workers.outcome import Outcome, map_good
from capworks.workers.preprocess import ExactDecoder, ImageLimits, Normalization
from capworks.workers.runtime import Runtime

STAGES = ("capworks_fetch_seconds", "capworks_decode_seconds", "capworks_batch_wait_seconds")


def count(histogram: str) -> float:
    return REGISTRY.get_sample_value(f"{histogram}_count") or 0.0


class MemoryFetcher:
    """An object store held in a dict; keys it lacks are not found, keys in `down` unavailable."""

    def __init__(self, objects: dict[str, bytes], down: frozenset[str] = frozenset()) -> None:
        self.objects = objects
        self.down = down
        self.lock = threading.Lock()
        self.started = 0

    def fetch(self, ref: ImageRef) -> bytes:
        with self.lock:
            self.started += 1
        if ref.uri in self.down:
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{ref.uri}: store down")
        try:
            return self.objects[ref.uri]
        except KeyError:
            raise StorageError(Code.NOT_FOUND, f"no such object: {ref.uri}") from None


class CountingCaptioner:
    """The real engine, counting the images it has captioned."""

    def __init__(self, engine: OfaEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.captioned = 0

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[EngineCaption]:
        captions = self.engine.caption_pixels(pixels)
        with self.lock:
            self.captioned += len(captions)
        return captions


def jpeg_bytes(img: Image.Image, size: tuple[int, int] = (0, 0)) -> bytes:
    buf = io.BytesIO()
    (img.resize(size) if size != (0, 0) else img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_path(
    fetcher: MemoryFetcher, captioner: object, engine: OfaEngine, room: int
) -> ImagePath:
    batcher = Batcher(lambda: captioner, max_batch=4, max_wait_ms=20)  # type: ignore[arg-type,return-value]
    return ImagePath(fetcher, engine.decoder, batcher, images_in_flight=room, decode_threads=2)


def test_every_image_gets_its_own_outcome_in_order_and_good_ones_match_the_raw_engine(
    tiny_engine: OfaEngine,
) -> None:
    scenes = [img for img, _ in sample_scenes(3, seed=61)]
    objects = {
        "mem://a.png": png_bytes(scenes[0]),
        "mem://broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "mem://b.jpg": jpeg_bytes(scenes[1]),
        "mem://down.png": png_bytes(scenes[2]),
    }
    fetcher = MemoryFetcher(objects, down=frozenset({"mem://down.png"}))
    path = image_path(fetcher, tiny_engine, tiny_engine, room=8)
    uris = ["mem://a.png", "mem://missing.png", "mem://broken.jpg", "mem://b.jpg", "mem://down.png"]
    before = {name: count(name) for name in STAGES}
    try:
        outcomes = path.caption([ImageRef(u) for u in uris])
    finally:
        path.close()
    # Every image was fetched; the three that arrived were decoded; two waited for a batch.
    assert {name: count(name) - before[name] for name in STAGES} == {
        "capworks_fetch_seconds": 5,
        "capworks_decode_seconds": 3,
        "capworks_batch_wait_seconds": 2,
    }
    assert [o.ref.uri for o in outcomes] == uris
    codes = [o.error.code if o.error else None for o in outcomes]
    assert codes == [None, Code.NOT_FOUND, Code.UNDECODABLE, None, Code.STORAGE_UNAVAILABLE]
    raw = tiny_engine.caption_images([objects["mem://a.png"], objects["mem://b.jpg"]])
    got = [o.result for o in outcomes if o.error is None]
    assert [g.caption.text for g in got] == [r.caption.text for r in raw]  # type: ignore[union-attr]
    assert [(g.width_px, g.height_px) for g in got] == [scenes[0].size, scenes[1].size]  # type: ignore[union-attr]


def test_images_in_flight_never_exceed_the_budget(tiny_engine: OfaEngine) -> None:
    blobs = {f"mem://{i}.png": png_bytes(img) for i, (img, _) in enumerate(sample_scenes(24, 62))}
    fetcher = MemoryFetcher(blobs)
    counting = CountingCaptioner(tiny_engine)
    most: list[int] = []
    real_fetch = fetcher.fetch

    def fetch_and_measure(ref: ImageRef) -> bytes:
        data = real_fetch(ref)
        with counting.lock:
            most.append(fetcher.started - counting.captioned)
        return data

    fetcher.fetch = fetch_and_measure  # type: ignore[method-assign]
    path = image_path(fetcher, counting, tiny_engine, room=5)
    try:
        outcomes = path.caption([ImageRef(u) for u in blobs])
    finally:
        path.close()
    assert all(o.error is None for o in outcomes) and counting.captioned == 24
    # Fetching is far faster than the model: without the budget all 24 would be in flight.
    assert max(most) == 5


class FakeStuckCaptioner:
    """A captioner that never answers until released, like a hung GPU."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[EngineCaption]:
        self.release.wait()
        raise RuntimeError("released")


def test_the_start_up_probe_passes_on_a_real_model_and_fails_on_one_that_does_not_answer(
    tiny_engine: OfaEngine,
) -> None:
    counting = CountingCaptioner(tiny_engine)
    path = image_path(MemoryFetcher({}), counting, tiny_engine, room=2)
    images_before = REGISTRY.get_sample_value("capworks_batch_images_sum") or 0.0
    try:
        assert path.probe(timeout_s=60) is True
    finally:
        path.close()
    assert counting.captioned == 1  # one generated image went through decode and the model
    # ...and is not counted as a user's image: /metrics and the batch sizes count only those.
    assert (REGISTRY.get_sample_value("capworks_batch_images_sum") or 0.0) == images_before
    assert not path.batcher.batch_sizes
    stuck = FakeStuckCaptioner()
    path = image_path(MemoryFetcher({}), stuck, tiny_engine, room=2)
    try:
        assert path.probe(timeout_s=0.5) is False
    finally:
        stuck.release.set()
        path.close()


def test_a_job_runs_through_the_runtime_with_a_fetcher_plugged_into_its_seam(
    tiny_dir: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'seam.db'}"
    redis_url = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"
    try:
        redis.Redis.from_url(redis_url).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unavailable: {exc}")
    scenes = [img for img, _ in sample_scenes(3, seed=63)]
    objects = {f"s3://mem/{i}.png": png_bytes(img) for i, img in enumerate(scenes)}
    fetcher = MemoryFetcher(objects, down=frozenset({"s3://mem/2.png"}))
    settings = Settings(
        model="tiny-random",
        cache_dir=tiny_dir.parent.parent,
        device="cpu",
        database_url=db_url,
        broker_url=redis_url,
        batch_size=4,
    )
    rt = Runtime.build(settings, fetcher=fetcher)
    try:
        job = Job.new(
            [ImageRef(u) for u in [*objects, "s3://mem/gone.png"]], None, job_id=uuid.uuid4().hex
        )
        result = run_job(job, rt)
        with create_engine(db_url).connect() as conn:
            captions = conn.execute(select(Caption.text)).scalars().all()
            failures = conn.execute(select(Failure.code)).scalars().all()
    finally:
        rt.close()
    assert (result.captioned, result.dead_lettered) == (2, 1)
    assert [(ref.uri, err.code) for ref, err in result.transient] == [
        ("s3://mem/2.png", Code.STORAGE_UNAVAILABLE)
    ]
    assert len(captions) == 2 and failures == ["not_found"]


def test_a_batch_step_keeps_failures_in_place_and_must_answer_every_input() -> None:
    error = StorageError(Code.NOT_FOUND, "gone")
    outcomes: list[Outcome[int]] = [
        Outcome(ImageRef("a"), 1),
        Outcome(ImageRef("b"), error),
        Outcome(ImageRef("c"), 3),
    ]
    doubled = map_good(outcomes, lambda values: [v * 2 for v in values])
    assert [o.result for o in doubled] == [2, error, 6]
    with pytest.raises(RuntimeError, match="1 results for 2 inputs"):
        map_good(outcomes, lambda values: values[:1])


def test_jpeg_draft_mode_is_off_by_default_and_keeps_the_original_size_when_on() -> None:
    photo = sample_scenes(1, seed=64)[0][0]
    data = jpeg_bytes(photo, (2000, 1500))
    norm = Normalization(64)
    exact = ExactDecoder(ImageLimits(), norm)
    drafted = ExactDecoder(ImageLimits(), norm, jpeg_draft=True)
    assert not exact.jpeg_draft
    a, b = exact.decode(data), drafted.decode(data)
    assert (a.width_px, a.height_px) == (b.width_px, b.height_px) == (2000, 1500)
    # The pixels are not ModelScope's: why draft mode stays off unless asked for.
    assert not np.array_equal(a.pixels, b.pixels)
    assert float(np.abs(a.pixels - b.pixels).mean()) < 0.05
