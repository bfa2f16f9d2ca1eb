"""Running one job inside a worker process: its images through the image path, then every final
outcome committed in one transaction.

Transient failures (storage unavailable, out of memory) are returned, not written, so the task
shell can retry just those images; permanent ones are written as dead letters at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from capworks.schema.errors import CapworksError, Kind
from capworks.schema.jobs import Job
from capworks.schema.uris import ImageRef
from capworks.workers.engine import CaptionedImage
from capworks.workers.metrics import JOB_SECONDS, observe_upload_latency
from capworks.workers.outcome import Outcome
from capworks.workers.runtime import Runtime


@dataclass(frozen=True)
class JobResult:
    """What a job committed, and which images should be tried again later."""

    captioned: int
    dead_lettered: int
    transient: tuple[tuple[ImageRef, CapworksError], ...]


@JOB_SECONDS.time()
def run_job(job: Job, rt: Runtime) -> JobResult:
    """Caption every image of `job`, commit the final outcomes, and observe an event job's
    upload -> caption latency for each caption committed."""
    final: list[Outcome[CaptionedImage]] = []
    transient: list[tuple[ImageRef, CapworksError]] = []
    for o in rt.path.caption(job.images):
        if o.error is not None and o.error.kind is Kind.TRANSIENT:
            transient.append((o.ref, o.error))
        else:
            final.append(o)
    counts = rt.save(final)
    observe_upload_latency(job.upload_time_s, counts.captioned)
    return JobResult(counts.captioned, counts.failed, tuple(transient))
