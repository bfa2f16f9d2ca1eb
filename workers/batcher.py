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

Only the model thread runs torch: torch's OpenMP team belongs to the thread that starts it, and
once a second thread has a team (say, the one that loaded the model), libgomp sees more OpenMP
threads than cores and stops spin-waiting between parallel regions. Measured on 2 CPU cores,
the shapes model ran 15-25% slower that way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from schema.errors import CapworksError, Code
from workers import metrics
from workers.engine import Caption

log = logging.getLogger(__name__)
BEAT_EVERY_S = 5.0  # the model thread's heartbeat, after batches and while idle


class Captioner(Protocol):
    """Model-ready pixels in, one caption per image out: the seam the batcher runs (`OfaEngine`,
    or whatever a test or another model plugs in)."""

    def caption_pixels(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        """Caption one batch of preprocessed images, in order."""
        ...


@dataclass
class _Item:
    pixels: np.ndarray
    future: Future[Caption]
    enqueued_s: float


class Batcher:
    """Collects images from many submitters into batches for one captioner."""

    def __init__(
        self,
        load: Callable[[], Captioner],
        max_batch: int,
        max_wait_ms: float,
        on_beat: Callable[[int], None] | None = None,
    ) -> None:
        self._load = load
        self._on_beat = on_beat
        self._last_beat_s = 0.0
        self._loaded: Future[Captioner] = Future()
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        metrics.WAITING_IMAGES.set_function(self._queue.qsize)
        self.batch_sizes: Counter[int] = Counter()
        self._thread = threading.Thread(target=self._run, name="capworks-batcher", daemon=True)
        self._thread.start()

    @property
    def captioner(self) -> Captioner:
        """The captioner, once the model thread has loaded it (raises what loading raised)."""
        return self._loaded.result()

    def submit(self, pixels: Sequence[np.ndarray]) -> list[Future[Caption]]:
        """Queue preprocessed images; each future resolves to its caption or a `CapworksError`."""
        now = time.monotonic()
        items = [_Item(p, Future(), now) for p in pixels]
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
            try:
                first = self._queue.get(timeout=BEAT_EVERY_S)
            except queue.Empty:
                continue
            if first is None:
                return
            batch = [first]
            deadline = first.enqueued_s + self._max_wait_s
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
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

    def _run_batch(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        for item in batch:
            metrics.BATCH_WAIT_SECONDS.observe(started - item.enqueued_s)
        results = self._caption_isolating(batch)
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            metrics.GPU_MEMORY_BYTES.labels("in_use").set(torch.cuda.memory_allocated())
            metrics.GPU_MEMORY_BYTES.labels("peak").set(torch.cuda.max_memory_allocated())
        captioned = sum(isinstance(r, Caption) for r in results)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, Caption):
                item.future.set_result(result)
            elif captioned and not isinstance(result, CapworksError):
                error = CapworksError(Code.MODEL_ERROR, f"{type(result).__name__}: {result}"[:2000])
                error.__cause__ = result
                item.future.set_exception(error)
            else:
                item.future.set_exception(result)

    def _caption_isolating(self, batch: list[_Item]) -> list[Caption | BaseException]:
        """Captions for the batch, halving it on failure until each failure is one image's."""
        log.info("batch of %d images", len(batch))
        try:
            with metrics.BATCH_SECONDS.time():
                captions = self._captioner.caption_pixels([i.pixels for i in batch])
            if len(captions) != len(batch):
                raise RuntimeError(f"{len(captions)} captions for a batch of {len(batch)} images")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(batch) == 1:
                return [CapworksError(Code.OUT_OF_MEMORY, "CUDA out of memory on a single image")]
            log.warning("CUDA out of memory on %d images: halving the batch", len(batch))
            metrics.OOM_SPLITS.inc()
            return self._halves(batch)
        except Exception as exc:  # noqa: BLE001 - isolated to its image, or handed to every job
            if len(batch) == 1:
                return [exc]
            log.warning("the model failed on %d images (%r): halving the batch", len(batch), exc)
            metrics.ERROR_SPLITS.inc()
            return self._halves(batch)
        self.batch_sizes[len(batch)] += 1
        metrics.BATCH_IMAGES.observe(len(batch))
        return list(captions)

    def _halves(self, batch: list[_Item]) -> list[Caption | BaseException]:
        half = len(batch) // 2
        return self._caption_isolating(batch[:half]) + self._caption_isolating(batch[half:])
