"""The retry policy as plain functions of plain values (Dramatiq's `Retries` + `compute_backoff`):
what to do with a job before it runs, and with its outcome after. The Celery task shell
(`capworks.workers.tasks`) only carries the decision out.

Before a run: a committed job's copy is dropped; a job for another caption identity (model,
revision, generation settings) than this worker's is dead-lettered as `wrong_model` (handing it
back could loop for ever on a farm where no worker serves that identity; a dead letter is seen,
and replayed once the right workers run); a job whose worker died `poison_deliveries`
times while it ran is split into single images, or, a single image, dead-lettered as poison; a
job that was running when its worker died once runs alone (exclusive), so that if it kills the
process again no innocent job beside it is charged with the death.

After a run: transient image failures are sent again as one job after a backoff, or at the
attempt cap dead-lettered as `retries_exhausted`; a job that failed as a whole (an exception, not
an image's error) is sent again whole after a backoff, or at the cap every image is dead-lettered
as `internal_error` with the exception.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from capworks.schema.backoff import compute_backoff
from capworks.schema.errors import CapworksError, Code
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef


class Before(enum.Enum):
    """What to do with a job that has just arrived."""

    DROP_DUPLICATE = "duplicate"
    WRONG_MODEL = "wrong_model"
    SPLIT = "split"
    POISON = "poison"
    RUN_ALONE = "run_alone"
    RUN = "run"


def before_run(
    done: bool, deaths: int, images: int, settings: Settings, wrong_model: bool = False
) -> Before:
    """Decide from the job's done mark, whether it is for another model, its unfinished runs
    and its size."""
    if done:
        return Before.DROP_DUPLICATE
    if wrong_model:
        return Before.WRONG_MODEL
    if deaths >= settings.poison_deliveries:
        return Before.SPLIT if images > 1 else Before.POISON
    return Before.RUN_ALONE if deaths > 0 else Before.RUN


@dataclass(frozen=True)
class After:
    """What to do once a job ran: send `retry` again after `delay_s` (as a job of these images,
    the whole job when `whole`), and dead-letter `dead_letters`."""

    retry: tuple[ImageRef, ...] = ()
    delay_s: float = 0.0
    whole: bool = False
    dead_letters: tuple[tuple[ImageRef, CapworksError], ...] = ()


def after_images_failed(
    transient: tuple[tuple[ImageRef, CapworksError], ...],
    attempt: int,
    settings: Settings,
    rng: random.Random | None = None,
) -> After:
    """The job committed; some images failed transiently (or none did)."""
    if not transient:
        return After()
    if attempt >= settings.max_attempts:
        tries = "1 try" if attempt == 1 else f"{attempt} tries"  # `dlq show` words it so too
        return After(
            dead_letters=tuple(
                (ref, CapworksError(Code.RETRIES_EXHAUSTED, f"{tries}; last: {err}"))
                for ref, err in transient
            )
        )
    delay_s = compute_backoff(attempt, settings.retry_base_s, settings.retry_cap_s, rng)
    return After(retry=tuple(ref for ref, _ in transient), delay_s=delay_s)


def after_job_failed(
    images: tuple[ImageRef, ...],
    exc: BaseException,
    attempt: int,
    settings: Settings,
    rng: random.Random | None = None,
) -> After:
    """The job raised as a whole before committing anything."""
    if attempt >= settings.max_attempts:
        error = CapworksError(Code.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:2000])
        return After(dead_letters=tuple((ref, error) for ref in images))
    delay_s = compute_backoff(attempt, settings.retry_base_s, settings.retry_cap_s, rng)
    return After(retry=images, delay_s=delay_s, whole=True)
