"""The model thread under faults, on the real shapes engine: CUDA out of memory with an allocator
that frees memory only when the last reference goes, an exception outside the model call, and a
hung model. A GPU cannot run here, so each `Fake...` captioner wraps the real engine and adds only
the fault."""

from __future__ import annotations

import threading
import time
import weakref
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


def prepared(engine: OfaEngine, count: int, seed: int = 52) -> list[np.ndarray]:
    blobs = [png_bytes(img) for img, _ in sample_scenes(count, seed=seed)]
    out = engine.preprocess(blobs)
    assert all(isinstance(p, PreparedImage) for p in out)
    return [p.pixels for p in out]  # type: ignore[union-attr]


class FakeDeviceBuffer:
    """Device memory held by a tensor: free again only once this object is garbage."""


class FakeDeviceMemory:
    """A device of `capacity` units, each allocation freed when its buffer goes (as PyTorch's
    caching allocator frees a block only when the last tensor referencing it is gone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def allocate(self, units: int) -> FakeDeviceBuffer:
        if self.in_use + units > self.capacity:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {units} units ({self.in_use} of"
                f" {self.capacity} in use)"
            )
        self.in_use += units
        buffer = FakeDeviceBuffer()
        weakref.finalize(buffer, self._free, units)
        return buffer

    def _free(self, units: int) -> None:
        self.in_use -= units


class FakeAllocatingCaptioner:
    """The real engine behind a forward that takes one unit per image for the encoder, then as
    much again for the decoder: a batch fits when twice its size fits. The encoder's buffer is a
    local of this frame, so a raised out of memory's traceback holds it, as a real one holds the
    forward's activations."""

    def __init__(self, engine: OfaEngine, memory: FakeDeviceMemory) -> None:
        self._engine = engine
        self.memory = memory
        self.attempts: list[int] = []

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        self.attempts.append(len(pixels))
        encoder = self.memory.allocate(len(pixels))
        decoder = self.memory.allocate(len(pixels))
        captions = self._engine.caption_pixels(pixels)
        del encoder, decoder
        return captions


def test_out_of_memory_frees_the_failed_forward_before_the_halves_and_lowers_the_batch(
    shapes_engine: OfaEngine,
) -> None:
    pixels = prepared(shapes_engine, 16)
    expected = [c.text for c in shapes_engine.caption_pixels(pixels)]
    # 8 images need 16 units: out of memory with the encoder's 8 held; 4 need 8, which fit
    # only if those 8 were freed first.
    fake = FakeAllocatingCaptioner(shapes_engine, FakeDeviceMemory(capacity=10))
    batcher = Batcher(lambda: fake, max_batch=8, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        first = batcher.submit(pixels[:8])
        first_results = [f.exception(timeout=300) or f.result().text for f in first]
        assert first_results == expected[:8]
        assert batcher.working_batch == 4
        assert metrics.WORKING_BATCH_IMAGES._value.get() == 4
        later = [f.result(timeout=300).text for f in batcher.submit(pixels[8:])]
    finally:
        batcher.close()
    assert later == expected[8:]
    assert fake.attempts == [8, 4, 4, 4, 4]  # the next batches: at most the lowered size
    assert dict(batcher.batch_sizes) == {4: 4}
    assert fake.memory.in_use == 0


def test_an_out_of_memory_on_one_image_leaves_the_working_batch_at_one(
    shapes_engine: OfaEngine,
) -> None:
    fake = FakeAllocatingCaptioner(shapes_engine, FakeDeviceMemory(capacity=1))
    batcher = Batcher(lambda: fake, max_batch=4, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        errors = [f.exception(timeout=300) for f in batcher.submit(prepared(shapes_engine, 4))]
    finally:
        batcher.close()
    assert all(isinstance(e, CapworksError) and e.code is Code.OUT_OF_MEMORY for e in errors)
    assert fake.attempts == [4, 2, 1, 1, 2, 1, 1]
    assert batcher.working_batch == 1


class FakeLazyCaptions(Sequence[Caption]):
    """Captions read back from the device when first iterated: a CUDA error is reported at the
    next synchronizing call, here the read, after the model call has returned."""

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Caption:  # type: ignore[override]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class FakeFailingReadbackCaptioner:
    """The real engine, except that the first batch's captions fail when they are read."""

    def __init__(self, engine: OfaEngine) -> None:
        self._engine = engine
        self.attempts: list[int] = []

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> Sequence[Caption]:
        self.attempts.append(len(pixels))
        if len(self.attempts) == 1:
            return FakeLazyCaptions(len(pixels))
        return self._engine.caption_pixels(pixels)


def test_an_exception_outside_the_model_call_fails_its_batch_and_the_next_batch_is_captioned(
    shapes_engine: OfaEngine,
) -> None:
    pixels = prepared(shapes_engine, 4)
    expected = [c.text for c in shapes_engine.caption_pixels(pixels[2:])]
    fake = FakeFailingReadbackCaptioner(shapes_engine)
    batcher = Batcher(lambda: fake, max_batch=2, max_wait_ms=2000)  # type: ignore[arg-type,return-value]
    try:
        errors = [f.exception(timeout=60) for f in batcher.submit(pixels[:2])]
        later = [f.result(timeout=300).text for f in batcher.submit(pixels[2:])]
    finally:
        batcher.close()
    # Not the images' fault: every job gets the cause and is retried whole.
    assert all(type(e) is RuntimeError and "illegal memory access" in str(e) for e in errors)
    assert later == expected


class FakeFailingStager:
    """A stager whose result fails when read (a bug in it): the images are not staged."""

    def stage(self, images: Sequence[object]) -> Sequence[object]:
        return FakeLazyCaptions(len(images))  # fails on the first read, as the captions above


def test_a_stager_that_fails_outside_its_call_fails_its_batch_and_the_thread_goes_on(
    shapes_engine: OfaEngine,
) -> None:
    pixels = prepared(shapes_engine, 1)
    batcher = Batcher(
        lambda: shapes_engine,
        1,
        2000,
        None,
        FakeFailingStager(),  # type: ignore[arg-type]
    )
    try:
        first = batcher.submit(pixels)[0].exception(timeout=60)
        second = batcher.submit(pixels)[0].exception(timeout=60)
    finally:
        batcher.close()
    assert type(first) is RuntimeError and type(second) is RuntimeError


class FakeHangingCaptioner:
    """The real engine, except that its first batch blocks until `release` is set, as a hung
    GPU kernel would."""

    def __init__(self, engine: OfaEngine) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=120)
        return self._engine.caption_pixels(pixels)


def wait_until(check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_hung_model_is_stalled_and_an_idle_or_finished_one_is_not(
    shapes_engine: OfaEngine,
) -> None:
    fake = FakeHangingCaptioner(shapes_engine)
    batcher = Batcher(lambda: fake, max_batch=2, max_wait_ms=10)  # type: ignore[arg-type,return-value]
    try:
        batcher.captioner  # noqa: B018 - wait for the model thread to start its loop
        wait_until(lambda: batcher.stalled_s(time.monotonic() + 3600) == 0.0)
        time.sleep(0.2)
        assert batcher.stalled_s(time.monotonic() + 3600) == 0.0  # idle: never stalled
        futures = batcher.submit(prepared(shapes_engine, 2))
        assert fake.entered.wait(timeout=30)
        stalled_before = batcher.stalled_s()
        time.sleep(0.3)
        assert batcher.stalled_s() >= stalled_before + 0.3
        assert batcher.stalled_s(time.monotonic() + 100) >= 100
        fake.release.set()
        assert all(isinstance(f.result(timeout=300), Caption) for f in futures)
        wait_until(lambda: batcher.stalled_s(time.monotonic() + 3600) == 0.0)
    finally:
        fake.release.set()
        batcher.close()
