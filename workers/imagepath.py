"""The one image path, run by both modes (the worker's jobs and the one-shot `capworks caption`):

    refs -> fetch (Fetcher, I/O threads) -> decode (Decoder, one thread per core)
         -> batcher (one model thread, batches across every caller) -> Outcome per image

Each image moves on as soon as its previous stage is done, so fetching, decoding and the model
overlap, and images from every job a process holds share the model's batches. A budget of images
in flight (fetched bytes or decoded pixels not yet captioned) bounds the memory a process uses:
a caller waits for room before an image is fetched, and the room comes back when the image is
captioned or fails. Every stage's failure is that image's `Outcome`; the others go on.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout

from PIL import Image

from capworks.schema.errors import CapworksError, StorageError
from capworks.schema.uris import ImageRef
from capworks.workers import metrics
from capworks.workers.batcher import Batcher
from capworks.workers.engine import Caption, CaptionedImage
from capworks.workers.fetch import Fetched, Fetcher
from capworks.workers.outcome import Outcome
from capworks.workers.preprocess import Decoder, PreparedImage, decode_safely

log = logging.getLogger(__name__)
FETCH_THREADS = 16  # object-store latency, not CPU, bounds fetching


class ImagePath:
    """Fetch, decode and caption images through one batcher, within a budget of images in flight."""

    def __init__(
        self,
        fetcher: Fetcher,
        decoder: Decoder,
        batcher: Batcher,
        *,
        images_in_flight: int,
        decode_threads: int = 0,
        fetch_threads: int = FETCH_THREADS,
    ) -> None:
        if images_in_flight < 1:
            raise ValueError(f"images_in_flight must be at least 1, not {images_in_flight}")
        self.fetcher = fetcher
        self.decoder = decoder
        self.batcher = batcher
        self.images_in_flight = images_in_flight
        self._room = threading.BoundedSemaphore(images_in_flight)
        self._fetch_pool = ThreadPoolExecutor(fetch_threads, "capworks-fetch")
        self._decode_pool = ThreadPoolExecutor(decode_threads or cpu_count(), "capworks-decode")

    def caption(self, refs: Sequence[ImageRef]) -> list[Outcome[CaptionedImage]]:
        """One outcome per reference, in order: a caption, or the error that stopped the image.
        An unexpected exception (a bug, not a bad image) is raised once every image has settled."""
        started = [self._start(ref) for ref in refs]
        wait(started)
        return [f.result() for f in started]

    def probe(self, timeout_s: float) -> bool:
        """Caption one small generated image through the decoder and the model thread: True
        once it answers, False when it has not within `timeout_s` (a GPU that stopped
        answering, a deadlocked runtime). A worker probes before it takes jobs, so a process
        restarted on a device that is still hung holds nothing when it is found out. The probe
        is not counted in the batch metrics: they count the images a user sent."""
        blank = io.BytesIO()
        Image.new("RGB", (32, 32), (127, 127, 127)).save(blank, format="PNG")
        prepared = self._decode(blank.getvalue())
        if isinstance(prepared, CapworksError):
            raise prepared
        (answer,) = self.batcher.submit([prepared.pixels], counted=False)
        try:
            answer.result(timeout=timeout_s)
        except FutureTimeout:
            return False
        return True

    def close(self) -> None:
        """Finish the batcher's queued batches and stop its model thread, then stop the fetch
        and decode threads."""
        self.batcher.close()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, ref: ImageRef) -> Future[Outcome[CaptionedImage]]:
        self._room.acquire()
        done: Future[Outcome[CaptionedImage]] = Future()
        done.add_done_callback(lambda _: self._room.release())
        try:
            self._fetch_pool.submit(self._fetch_and_decode, ref, done)
        except BaseException:
            done.cancel()  # gives the room back
            raise
        return done

    def _fetch_and_decode(self, ref: ImageRef, done: Future[Outcome[CaptionedImage]]) -> None:
        try:
            try:
                with metrics.FETCH_SECONDS.time():
                    got = self.fetcher.fetch(ref)
            except StorageError as exc:
                done.set_result(Outcome(ref, exc))
                return
            if isinstance(got, Fetched):  # another version than listed: caption what was read
                ref, data = got.ref, got.data
            else:
                data = got
            prepared = self._decode_pool.submit(self._decode, data).result()
            del data, got  # the encoded bytes are not needed past decoding
            if isinstance(prepared, CapworksError):
                done.set_result(Outcome(ref, prepared))
                return
            (future,) = self.batcher.submit([prepared.pixels])
            future.add_done_callback(lambda f: _settle(ref, prepared, f, done))
        except BaseException as exc:  # noqa: BLE001 - raised to the caller by `caption`
            log.exception("image path failed unexpectedly on %s", ref.uri)
            if not done.done():
                done.set_exception(exc)

    def _decode(self, data: bytes) -> PreparedImage | CapworksError:
        with metrics.DECODE_SECONDS.time():
            return decode_safely(self.decoder, data)


def _settle(
    ref: ImageRef,
    prepared: PreparedImage,
    captioned: Future[Caption],
    done: Future[Outcome[CaptionedImage]],
) -> None:
    """Turn the batcher's answer for one image into its outcome."""
    exc = captioned.exception()
    if exc is None:
        caption = captioned.result()
        done.set_result(
            Outcome(ref, CaptionedImage(caption, prepared.width_px, prepared.height_px))
        )
    elif isinstance(exc, CapworksError):
        done.set_result(Outcome(ref, exc))
    else:
        done.set_exception(exc)


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
