"""Dynamic batching across jobs: images from every job a worker process holds share one queue,
and a batch runs when it is full or when its oldest image has waited `max_wait_ms`.

So single-image jobs from upload events still fill GPU batches. One model thread loads the
model and runs every batch; job threads submit prepared images and wait on futures. A batch that
raises is halved and each half tried again, down to single images, so one image the model fails
on cannot fail the images (of other jobs, too) that shared its batch:
- CUDA out of memory: an image that still fails alone gets `out_of_memory` (transient).
- any other exception: when some images of the batch were captioned, each image that fails alone
  gets `model_error` (permanent) with the exception's type and message; when every image fails
  alone, the fault is the model's, not theirs, and every image gets the exception itself (its job
  is retried as a whole, as for any other job-wide failure).

The halving happens after the failed forward's exception is dropped, so the tensors its
traceback holds are free again before the halves run (otherwise every half runs out of memory
too). An out of memory also lowers the process's working batch (`working_batch`): later
batches collect at most the size that was halved to, rather than failing at the same size again,
for the rest of the process's life (a restart starts from the configured batch size again).

An exception outside the model (the stager's, the metrics', a CUDA call's after a sticky error)
fails the images of its batch that are not settled yet with that exception, and the model thread
goes on to the next batch: it never dies of one. `stalled_s` says how long the model thread has
had work without progress, for a watcher in another thread (the lease renewer) to act on.

With device preprocessing (`CAPWORKS_PREPROCESS=gpu`) a `Stager` turns the batch's JPEGs, left
encoded by the decode stage, into pixels on the model's device just before the model; an image
it cannot prepare fails alone with its image error.

Only the model thread runs torch: torch's OpenMP team belongs to the thread that starts it, and
once a second thread has a team (say, the one that loaded the model), libgomp sees more OpenMP
threads than cores and stops spin-waiting between parallel regions. Measured on 2 CPU cores,
the shapes model ran 15-25% slower that way.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from capworks.schema.errors import CapworksError, Code
from capworks.workers import metrics
from capworks.workers.engine import Caption
from capworks.workers.preprocess import JpegBytes

log = logging.getLogger(__name__)
BEAT_EVERY_S = 5.0  # the model thread's heartbeat, after batches and while idle


# What a captioner takes: host arrays, or tensors already on its device.
ModelPixels = np.ndarray | torch.Tensor


class Captioner(Protocol):
    """Model-ready pixels in, one caption per image out: the seam the batcher runs (`OfaEngine`,
    or whatever a test or another model plugs in)."""

    def caption_pixels(self, pixels: Sequence[ModelPixels]) -> list[Caption]:
        """Caption one batch of preprocessed images, in order."""
        ...


class Stager(Protocol):
    """The model thread's step before the model: what the decode stage handed on to pixels the
    captioner takes, per image (`DevicePreprocessor`, for `CAPWORKS_PREPROCESS=gpu`)."""

    def stage(self, images: Sequence[np.ndarray | JpegBytes]) -> list[ModelPixels | CapworksError]:
        """One result per image, in order: its pixels, or the error that stops it alone."""
        ...


@dataclass
class _Item:
    pixels: np.ndarray | JpegBytes
    future: Future[Caption]
    enqueued_s: float
    counted: bool  # False for a probe: run, but kept out of the batch metrics


@dataclass
class _Ready:
    pixels: ModelPixels
    future: Future[Caption]
    counted: bool


# Where the model thread is, and since when (time.monotonic): waiting for a first image, in a
# batch (collecting and running it), or between a finished batch and the next wait. One tuple,
# so another thread reads both at once.
_Phase = tuple[Literal["waiting", "batch", "after"], float]


class Batcher:
    """Collects images from many submitters into batches for one captioner."""

    def __init__(
        self,
        load: Callable[[], Captioner],
        max_batch: int,
        max_wait_ms: float,
        on_beat: Callable[[int], None] | None = None,
        stager: Stager | None = None,
    ) -> None:
        self._load = load
        self._stager = stager
        self._on_beat = on_beat
        self._last_beat_s = 0.0
        self._loaded: Future[Captioner] = Future()
        self._max_batch = max_batch
        self._working_batch = max_batch
        metrics.WORKING_BATCH_IMAGES.set(max_batch)
        self._max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._phase: _Phase = ("waiting", time.monotonic())
        metrics.WAITING_IMAGES.set_function(self._queue.qsize)
        self.batch_sizes: Counter[int] = Counter()
        self._thread = threading.Thread(target=self._run, name="capworks-batcher", daemon=True)
        self._thread.start()

    @property
    def captioner(self) -> Captioner:
        """The captioner, once the model thread has loaded it (raises what loading raised)."""
        return self._loaded.result()

    @property
    def working_batch(self) -> int:
        """The most images the next batch may hold: `max_batch`, lowered by out of memory."""
        return self._working_batch

    def stalled_s(self, now_s: float | None = None) -> float:
        """Seconds the model thread has had work (a batch running, or images queued after one)
        without progress (a batch finished, or the loop back to waiting); 0.0 while it waits
        for images, or while it loads the model."""
        phase, since_s = self._phase
        if phase == "waiting" or (phase == "after" and self._queue.empty()):
            return 0.0
        return max(0.0, (time.monotonic() if now_s is None else now_s) - since_s)

    def submit(
        self, pixels: Sequence[np.ndarray | JpegBytes], *, counted: bool = True
    ) -> list[Future[Caption]]:
        """Queue preprocessed images (or JPEGs for the stager); each future resolves to its
        caption or a `CapworksError`. Images not `counted` (a health probe's) are captioned
        like the others but left out of the batch sizes and the batch metrics."""
        now = time.monotonic()
        items = [_Item(p, Future(), now, counted) for p in pixels]
        for item in items:
            self._queue.put(item)
        return [item.future for item in items]

    def close(self) -> None:
        """Finish queued batches and stop the model thread."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            self._captioner = self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the model
            self._loaded.set_exception(exc)
            return
        self._loaded.set_result(self._captioner)
        while True:
            self._beat()
            self._phase = ("waiting", time.monotonic())
            try:
                first = self._queue.get(timeout=BEAT_EVERY_S)
            except queue.Empty:
                continue
            self._phase = ("batch", time.monotonic())
            if first is None:
                return
            batch = [first]
            deadline = first.enqueued_s + self._max_wait_s
            stop = False
            while len(batch) < self._working_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch_settling(batch)
            self._phase = ("after", time.monotonic())
            if stop:
                return

    def _beat(self) -> None:
        """Tell whoever watches (the heartbeat) that the model thread is alive, at most every
        `BEAT_EVERY_S`: a model thread hung in a batch stops beating."""
        now = time.monotonic()
        if self._on_beat is None or now - self._last_beat_s < BEAT_EVERY_S:
            return
        self._last_beat_s = now
        try:
            self._on_beat(self._queue.qsize())
        except Exception as exc:  # noqa: BLE001 - a missed beat must not stop the model thread
            log.warning("heartbeat not written: %r", exc)

    def _run_batch_settling(self, batch: list[_Item]) -> None:
        """Run one batch; whatever escapes it fails the batch's images not settled yet, so
        the model thread lives on and no submitter waits for ever."""
        try:
            self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting image, as a model fault
            log.exception("a batch of %d images failed outside the model", len(batch))
            traceback.clear_frames(exc.__traceback__)  # its frames' tensors go; its lines stay
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)

    def _run_batch(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        for item in batch:
            if item.counted:
                metrics.BATCH_WAIT_SECONDS.observe(started - item.enqueued_s)
        ready = self._stage(batch)
        if not ready:
            return
        results = self._caption_isolating(ready)
        captioned = sum(isinstance(r, Caption) for r in results)
        for image, result in zip(ready, results, strict=True):
            if isinstance(result, Caption):
                image.future.set_result(result)
            elif captioned and not isinstance(result, CapworksError):
                error = CapworksError(Code.MODEL_ERROR, f"{type(result).__name__}: {result}"[:2000])
                error.__cause__ = result
                image.future.set_exception(error)
            else:
                image.future.set_exception(result)
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            metrics.GPU_MEMORY_BYTES.labels("in_use").set(torch.cuda.memory_allocated())
            metrics.GPU_MEMORY_BYTES.labels("peak").set(torch.cuda.max_memory_allocated())

    def _stage(self, batch: list[_Item]) -> list[_Ready]:
        """The images the model can take; one the stager fails is settled here, alone."""
        images = [item.pixels for item in batch]
        staged: Sequence[ModelPixels | BaseException]
        try:
            staged = self._stager.stage(images) if self._stager else [_host(i) for i in images]
            if len(staged) != len(batch):
                raise RuntimeError(f"{len(staged)} staged images for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - a stager bug is every image's, as a model fault
            log.exception("staging %d images failed", len(batch))
            staged = [exc] * len(batch)
        ready = []
        for item, pixels in zip(batch, staged, strict=True):
            if isinstance(pixels, BaseException):
                item.future.set_exception(pixels)
            else:
                ready.append(_Ready(pixels, item.future, item.counted))
        return ready

    def _caption_isolating(self, batch: list[_Ready]) -> list[Caption | BaseException]:
        """Captions for the batch, halving it on failure until each failure is one image's."""
        counted = sum(i.counted for i in batch)
        if counted:
            log.info("batch of %d images", counted)
        if counted < len(batch):
            log.info("%d probe image(s) through the model", len(batch) - counted)
        out_of_memory = False
        failed: Exception | None = None
        try:
            with metrics.BATCH_SECONDS.time() if counted else contextlib.nullcontext():
                captions = self._captioner.caption_pixels([i.pixels for i in batch])
            if len(captions) != len(batch):
                raise RuntimeError(f"{len(captions)} captions for a batch of {len(batch)} images")
        except torch.cuda.OutOfMemoryError as exc:
            # Not kept past this block: its traceback's frames hold the failed forward's tensors.
            traceback.clear_frames(exc.__traceback__)
            out_of_memory = True
        except Exception as exc:  # noqa: BLE001 - isolated to its image, or handed to every job
            traceback.clear_frames(exc.__traceback__)  # kept for its job: lines, not tensors
            failed = exc
        if out_of_memory:
            return self._after_out_of_memory(batch)
        if failed is not None:
            if len(batch) == 1:
                return [failed]
            log.warning("the model failed on %d images (%r): halving the batch", len(batch), failed)
            metrics.ERROR_SPLITS.inc()
            return self._halves(batch)
        if counted:
            self.batch_sizes[counted] += 1
            metrics.BATCH_IMAGES.observe(counted)
        return list(captions)

    def _after_out_of_memory(self, batch: list[_Ready]) -> list[Caption | BaseException]:
        """Free what the failed forward held, lower the working batch, and halve."""
        _free_device_memory()
        if len(batch) == 1:
            return [CapworksError(Code.OUT_OF_MEMORY, "CUDA out of memory on a single image")]
        if len(batch) // 2 < self._working_batch:
            self._working_batch = len(batch) // 2
            metrics.WORKING_BATCH_IMAGES.set(self._working_batch)
            log.warning(
                "CUDA out of memory on %d images: halving it, and batches of at most %d from now",
                len(batch),
                self._working_batch,
            )
        else:
            log.warning("CUDA out of memory on %d images: halving the batch", len(batch))
        metrics.OOM_SPLITS.inc()
        return self._halves(batch)

    def _halves(self, batch: list[_Ready]) -> list[Caption | BaseException]:
        half = len(batch) // 2
        return self._caption_isolating(batch[:half]) + self._caption_isolating(batch[half:])


def _free_device_memory() -> None:
    """Hand the CUDA cache's free blocks back after an out of memory, once the failed forward's
    tensors are garbage (a cycle can keep a frame alive past its last reference)."""
    gc.collect()
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return
    try:
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - raises after a sticky CUDA error; the halves fail on
        log.warning("emptying the CUDA cache failed: %r", exc)


def _host(image: np.ndarray | JpegBytes) -> ModelPixels | CapworksError:
    """With no stager every image comes as pixels; a JPEG left encoded is a wiring fault."""
    if isinstance(image, JpegBytes):
        return CapworksError(Code.INTERNAL_ERROR, "a JPEG left for the device, but no stager")
    return image
