"""Running one job inside a worker process: fetch and decode its images in threads, caption them
through the shared batcher, and commit every final outcome in one transaction.

Transient failures (storage unavailable, out of memory) are returned, not written, so the task
shell can retry just those images; permanent ones are written as dead letters at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from schema.errors import CapworksError, Kind
from schema.jobs import Job
from schema.uris import ImageRef
from workers.engine import CaptionedImage
from workers.metrics import JOB_SECONDS
from workers.persist import Outcome
from workers.pipeline import fetch_many
from workers.preprocess import PreparedImage
from workers.runtime import Runtime


@dataclass(frozen=True)
class JobResult:
    """What a job committed, and which images should be tried again later."""

    captioned: int
    dead_lettered: int
    transient: tuple[tuple[ImageRef, CapworksError], ...]


@JOB_SECONDS.time()
def run_job(job: Job, rt: Runtime) -> JobResult:
    """Caption every image of `job` and commit the final outcomes."""
    refs = job.images
    fetched = fetch_many(refs, rt.fetcher, rt.fetch_pool)
    results: list[CaptionedImage | CapworksError | None] = [
        f if isinstance(f, CapworksError) else None for f in fetched
    ]
    to_prepare = [i for i, f in enumerate(fetched) if isinstance(f, bytes)]
    prepared = rt.engine.preprocess([fetched[i] for i in to_prepare])  # type: ignore[misc]
    waiting = []
    for i, p in zip(to_prepare, prepared, strict=True):
        if isinstance(p, PreparedImage):
            waiting.append((i, p))
        else:
            results[i] = p
    futures = rt.batcher.submit([p.pixels for _, p in waiting])
    for (i, p), future in zip(waiting, futures, strict=True):
        try:
            results[i] = CaptionedImage(future.result(), p.width_px, p.height_px)
        except CapworksError as exc:
            results[i] = exc
    final: list[Outcome] = []
    transient: list[tuple[ImageRef, CapworksError]] = []
    for ref, result in zip(refs, results, strict=True):
        assert result is not None
        if isinstance(result, CapworksError) and result.kind is Kind.TRANSIENT:
            transient.append((ref, result))
        else:
            final.append(Outcome(ref, result))
    counts = rt.save(final)
    return JobResult(counts.captioned, counts.failed, tuple(transient))
