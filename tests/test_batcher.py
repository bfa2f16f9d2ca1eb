"""Dynamic batching on the real shapes engine. CUDA out-of-memory cannot happen on this CPU
machine, so `FakeOomEngine` raises torch's real OutOfMemoryError above a batch size; everything
else is the real engine. The halving and its recovery are what is under test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from conftest import png_bytes

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.errors import CapworksError, Code
from capworks.workers import metrics
from capworks.workers.batcher import Batcher
from capworks.workers.engine import Caption, OfaEngine
from capworks.workers.preprocess import PreparedImage

pytestmark = pytest.mark.slow


class FakeOomEngine:
    """The real engine, except that batches larger than `fits` fail as a full GPU would."""

    def __init__(self, engine: OfaEngine, fits: int) -> None:
        self._engine = engine
        self._fits = fits
        self.attempts: list[int] = []

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        self.attempts.append(len(pixels))
        if len(pixels) > self._fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._engine.caption_pixels(pixels)


def prepared(engine: OfaEngine, count: int) -> list[np.ndarray]:
    blobs = [png_bytes(img) for img, _ in sample_scenes(count, seed=51)]
    out = engine.preprocess(blobs)
    assert all(isinstance(p, PreparedImage) for p in out)
    return [p.pixels for p in out]  # type: ignore[union-attr]


def test_out_of_memory_halves_the_batch_until_it_fits(shapes_engine: OfaEngine) -> None:
    pixels = prepared(shapes_engine, 8)
    expected = [c.text for c in shapes_engine.caption_pixels(pixels)]
    fake = FakeOomEngine(shapes_engine, fits=2)
    splits_before = metrics.OOM_SPLITS._value.get()
    batcher = Batcher(lambda: fake, max_batch=8, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        captions = [f.result(timeout=300).text for f in batcher.submit(pixels)]
    finally:
        batcher.close()
    assert captions == expected
    assert fake.attempts == [8, 4, 2, 2, 4, 2, 2]
    assert dict(batcher.batch_sizes) == {2: 4}
    assert metrics.OOM_SPLITS._value.get() - splits_before == 3


def test_an_image_too_large_alone_gets_an_out_of_memory_error(shapes_engine: OfaEngine) -> None:
    pixels = prepared(shapes_engine, 2)
    fake = FakeOomEngine(shapes_engine, fits=0)
    batcher = Batcher(lambda: fake, 2, 2000)  # type: ignore[arg-type,return-value]
    try:
        futures = batcher.submit(pixels)
        errors = [f.exception(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert all(isinstance(e, CapworksError) and e.code is Code.OUT_OF_MEMORY for e in errors)


class FakeFaultyEngine:
    """The real engine, except that any batch holding the `bad` image raises, as a model bug
    triggered by one input would (a shape the kernels reject, a NaN check)."""

    def __init__(self, engine: OfaEngine, bad: np.ndarray | None) -> None:
        self._engine = engine
        self._bad = bad
        self.attempts: list[int] = []

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        self.attempts.append(len(pixels))
        if self._bad is None or any(p is self._bad for p in pixels):
            raise ValueError("expected a finite input")
        return self._engine.caption_pixels(pixels)


def test_a_model_error_on_one_image_fails_that_image_alone(shapes_engine: OfaEngine) -> None:
    pixels = prepared(shapes_engine, 8)
    expected = [c.text for c in shapes_engine.caption_pixels(pixels)]
    fake = FakeFaultyEngine(shapes_engine, bad=pixels[5])
    batcher = Batcher(lambda: fake, max_batch=8, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        futures = batcher.submit(pixels)
        errors = [f.exception(timeout=300) for f in futures]
    finally:
        batcher.close()
    error = errors[5]
    assert isinstance(error, CapworksError) and error.code is Code.MODEL_ERROR
    assert error.message == "ValueError: expected a finite input"
    assert [f.result().text for i, f in enumerate(futures) if i != 5] == expected[:5] + expected[6:]
    assert fake.attempts == [8, 4, 4, 2, 1, 1, 2]


def test_a_model_that_fails_on_every_image_hands_its_exception_to_every_job(
    shapes_engine: OfaEngine,
) -> None:
    fake = FakeFaultyEngine(shapes_engine, bad=None)
    batcher = Batcher(lambda: fake, max_batch=4, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        errors = [f.exception(timeout=300) for f in batcher.submit(prepared(shapes_engine, 4))]
    finally:
        batcher.close()
    # Not the images' fault: no image is dead-lettered for it; their jobs are retried whole.
    assert all(type(e) is ValueError for e in errors)
