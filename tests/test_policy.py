"""The retry policy, one test per branch: plain values in, a decision out."""

from __future__ import annotations

import random

import pytest

from capworks.schema.errors import Code, StorageError
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef
from capworks.workers.policy import Before, after_images_failed, after_job_failed, before_run

SETTINGS = Settings(max_attempts=3, poison_deliveries=3, retry_base_s=2, retry_cap_s=300)
A, B = ImageRef("s3://b/a.png"), ImageRef("s3://b/b.png")
DOWN = StorageError(Code.STORAGE_UNAVAILABLE, "503 Slow Down")


def test_a_committed_jobs_copy_is_dropped_whatever_else_is_true() -> None:
    assert before_run(True, 5, 4, SETTINGS) is Before.DROP_DUPLICATE


def test_a_job_for_another_model_is_dead_lettered_before_anything_else_but_a_done_mark() -> None:
    assert before_run(False, 3, 4, SETTINGS, wrong_model=True) is Before.WRONG_MODEL
    assert before_run(True, 0, 4, SETTINGS, wrong_model=True) is Before.DROP_DUPLICATE


def test_a_job_that_killed_its_worker_too_often_is_split_or_poison() -> None:
    assert before_run(False, 3, 4, SETTINGS) is Before.SPLIT
    assert before_run(False, 3, 1, SETTINGS) is Before.POISON


def test_a_job_that_was_running_when_its_worker_died_runs_alone() -> None:
    assert before_run(False, 1, 4, SETTINGS) is Before.RUN_ALONE
    assert before_run(False, 2, 1, SETTINGS) is Before.RUN_ALONE


def test_a_fresh_job_runs_beside_the_others() -> None:
    assert before_run(False, 0, 64, SETTINGS) is Before.RUN


def test_a_job_with_no_transient_failures_is_just_done() -> None:
    after = after_images_failed((), 1, SETTINGS)
    assert (after.retry, after.dead_letters) == ((), ())


def test_transient_failures_are_retried_after_a_jittered_backoff() -> None:
    after = after_images_failed(((A, DOWN), (B, DOWN)), 2, SETTINGS, random.Random(7))
    assert after.retry == (A, B) and not after.whole and after.dead_letters == ()
    assert after.delay_s == pytest.approx(random.Random(7).uniform(0, 4))


def test_transient_failures_at_the_attempt_cap_are_dead_lettered_as_retries_exhausted() -> None:
    after = after_images_failed(((A, DOWN),), 3, SETTINGS)
    assert after.retry == ()
    ((ref, error),) = after.dead_letters
    assert ref == A and error.code is Code.RETRIES_EXHAUSTED
    assert error.message == "3 tries; last: storage_unavailable: 503 Slow Down"
    (once,) = after_images_failed(
        ((A, DOWN),), 1, SETTINGS.model_copy(update={"max_attempts": 1})
    ).dead_letters
    assert once[1].message == "1 try; last: storage_unavailable: 503 Slow Down"


def test_a_job_that_raised_is_retried_whole_until_the_cap_then_each_image_is_dead_lettered() -> (
    None
):
    again = after_job_failed((A, B), RuntimeError("boom"), 1, SETTINGS, random.Random(1))
    assert again.retry == (A, B) and again.whole and again.dead_letters == ()
    assert 0 <= again.delay_s <= 2
    final = after_job_failed((A, B), RuntimeError("boom"), 3, SETTINGS)
    assert final.retry == ()
    assert [(r, e.code, e.message) for r, e in final.dead_letters] == [
        (A, Code.INTERNAL_ERROR, "RuntimeError: boom"),
        (B, Code.INTERNAL_ERROR, "RuntimeError: boom"),
    ]
