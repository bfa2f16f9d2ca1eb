"""Per-process worker resources, built once on first use (never at import time): the model on
its device behind the batcher, the image path, the result writer, the run ledger and the run
slots. `Runtime.build` takes the seams (a `Fetcher`, a `Captioner` loader), so a test plugs a
real alternative in there instead of patching modules."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import redis
import torch

from capworks.schema import heartbeat
from capworks.schema.backoff import compute_backoff
from capworks.schema.checkpoint import CheckpointConfig, resolve_checkpoint
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError
from capworks.schema.queue import make_redis
from capworks.schema.settings import Settings
from capworks.schema.startup import wait_until_reachable
from capworks.schema.storage import LazyS3Client
from capworks.workers import metrics
from capworks.workers.batcher import Batcher, Captioner, Stager
from capworks.workers.device_preprocess import DevicePreprocessor, JpegPassThrough
from capworks.workers.engine import CaptionedImage, OfaEngine
from capworks.workers.fetch import Fetcher, StoreFetcher
from capworks.workers.imagepath import ImagePath
from capworks.workers.ledger import RunLedger
from capworks.workers.ofa_model import pick_device
from capworks.workers.outcome import Outcome
from capworks.workers.persist import DatabaseUnavailable, ResultWriter, SaveCounts
from capworks.workers.preprocess import Decoder, ExactDecoder, ImageLimits, Normalization
from capworks.workers.slots import RunSlots

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_IMAGES_IN_FLIGHT = 64


def images_in_flight(settings: Settings) -> int:
    """The per-process budget of images between fetch and caption (see settings)."""
    return settings.images_in_flight or max(MIN_IMAGES_IN_FLIGHT, 4 * settings.batch_size)


def exact_decoder(config: CheckpointConfig, settings: Settings) -> ExactDecoder:
    """The decoder the checkpoint's resolution and normalisation, and the image limits, call for."""
    return ExactDecoder(
        ImageLimits(settings.max_image_bytes, settings.max_image_px),
        Normalization(config.patch_image_size, *config.mean_std),
        settings.jpeg_draft,
    )


def preprocessing(config: CheckpointConfig, settings: Settings) -> tuple[Decoder, Stager | None]:
    """The decode stage's decoder and the model thread's stager that `settings.preprocess` asks
    for: `exact`, Pillow in the decode threads and nothing left for the model thread; `gpu`,
    JPEG headers checked in the decode threads and their pixels decoded on the model's device
    just before the model (refused here, at start, without a torchvision for this torch)."""
    exact = exact_decoder(config, settings)
    if settings.preprocess == "exact":
        return exact, None
    on_device = DevicePreprocessor(exact.limits, exact.norm, pick_device(settings.device))
    return JpegPassThrough(exact), on_device


def load_engine(config: CheckpointConfig, settings: Settings) -> Callable[[], OfaEngine]:
    """A loader for the batcher's model thread: torch's thread count is set in the thread that
    runs torch (OpenMP's setting is per thread), then the model is loaded."""

    def load() -> OfaEngine:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        log.info("model thread runs %d torch threads", torch.get_num_threads())
        started = time.monotonic()
        engine = OfaEngine.from_settings(config, settings)
        metrics.MODEL_LOAD_SECONDS.set(time.monotonic() - started)
        return engine

    return load


def build_path(
    settings: Settings,
    config: CheckpointConfig,
    *,
    fetcher: Fetcher | None = None,
    captioner: Callable[[], Captioner] | None = None,
    decoder: Decoder | None = None,
    on_beat: Callable[[int], None] | None = None,
) -> ImagePath:
    """The image path with its batcher, once the model is loaded; each seam defaults to the
    real part (`StoreFetcher` on the configured S3, the decoder of `preprocessing`, `OfaEngine`
    on the configured device). Both modes build theirs here; `on_beat` is the model thread's
    heartbeat (images waiting)."""
    default_decoder, stager = preprocessing(config, settings)  # before the model: fails fast
    # The batcher's thread loads the model and is the only one to run it (see batcher.py).
    batcher = Batcher(
        captioner or load_engine(config, settings),
        settings.batch_size,
        settings.max_batch_wait_ms,
        on_beat,
        stager,
    )
    try:
        batcher.captioner  # noqa: B018 - wait for the model; raises what loading raised
    except BaseException:
        batcher.close()
        raise
    return ImagePath(
        fetcher or StoreFetcher.from_settings(settings, LazyS3Client(settings)),
        decoder or default_decoder,
        batcher,
        images_in_flight=images_in_flight(settings),
        decode_threads=settings.decode_threads,
    )


@dataclass
class Runtime:
    """Everything a job needs, shared by the job threads of one worker process."""

    settings: Settings
    config: CheckpointConfig
    path: ImagePath
    writer: ResultWriter
    ledger: RunLedger
    slots: RunSlots = field(default_factory=RunSlots)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        fetcher: Fetcher | None = None,
        captioner: Callable[[], Captioner] | None = None,
        decoder: Decoder | None = None,
    ) -> Runtime:
        """Load the model and open every connection (seams as in `build_path`)."""
        config = resolve_checkpoint(settings.model, settings.revision, settings.checkpoint_dir)
        slots = RunSlots()
        client = make_redis(settings, socket_timeout_s=5)
        started: list[float] = []  # Redis's clock at the first beat
        built: list[ImagePath] = []  # the first beat comes before build_path returns

        def on_beat(images_waiting: int) -> None:
            captioner = built[0].batcher.captioner if built else None
            beat = heartbeat.beat(
                client,
                device=str(getattr(captioner, "device", settings.device)),
                model=config.model_id,
                queue=settings.queue_name,
                jobs_in_flight=slots.running,
                images_waiting=images_waiting,
                started_at=started[0] if started else None,
                ttl_s=settings.heartbeat_ttl_s,
            )
            started[:] = [beat.started_at]

        path = build_path(
            settings, config, fetcher=fetcher, captioner=captioner, decoder=decoder, on_beat=on_beat
        )
        built.append(path)
        return cls(
            settings=settings,
            config=config,
            path=path,
            writer=ResultWriter(
                wait_until_reachable(
                    lambda: connect(settings.database_url), "the database", settings.start_wait_s
                ),
                config,
            ),
            ledger=RunLedger(client),
            slots=slots,
        )

    def close(self) -> None:
        """Stop the model thread and the image path's threads, and drop the heartbeat."""
        self.path.close()
        try:
            heartbeat.forget(self.ledger.redis, self.settings.queue_name)
        except redis.RedisError as exc:
            log.warning("heartbeat not removed (%s); it expires by itself", exc)

    def save(
        self,
        outcomes: Sequence[Outcome[CaptionedImage]],
        job_id: str | None = None,
        trace: str | None = None,
    ) -> SaveCounts:
        """Commit final outcomes (captions and dead letters) and count them in the metrics;
        while the database is down, wait for it (the job stays unacknowledged meanwhile)."""
        with metrics.WRITE_SECONDS.time():
            counts = self.durably(lambda: self.writer.save(outcomes, job_id=job_id, trace=trace))
        for o in outcomes:
            if isinstance(o.result, CapworksError):
                metrics.IMAGES.labels("dead_letter", o.result.code.value).inc()
            else:
                metrics.IMAGES.labels("captioned", "").inc()
        return counts

    def durably(self, write: Callable[[], T]) -> T:
        """Run a database write until it succeeds: a database outage is waited out with a
        backoff that grows to `database_retry_cap_s`, never turned into a lost job."""
        attempt = 1
        while True:
            try:
                return write()
            except DatabaseUnavailable as exc:
                delay_s = compute_backoff(
                    attempt, self.settings.retry_base_s, self.settings.database_retry_cap_s
                )
                log.warning(
                    "database unavailable (%s); writing again in %.1f s (wait %d)",
                    exc.message,
                    delay_s,
                    attempt,
                )
                metrics.DATABASE_WAITS.inc()
                time.sleep(delay_s)
                attempt += 1


_runtime: Runtime | None = None
_build: Callable[[Settings], Runtime] = Runtime.build
_lock = threading.Lock()


def configure(build: Callable[[Settings], Runtime]) -> None:
    """Set how this process's runtime is built: a test's worker wrapper passes `Runtime.build`
    with its own seams here before the worker starts."""
    global _build
    _build = build


def built_runtime() -> Runtime | None:
    """The process's runtime if it has been built (for shutdown)."""
    return _runtime


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built by the first caller."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = _build(settings)
            log.info(
                "worker runtime ready: %s on %s, %d images in flight",
                settings.model,
                settings.device,
                _runtime.path.images_in_flight,
            )
        return _runtime
