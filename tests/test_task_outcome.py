"""The word a job's result carries into Flower's Result column, where every handled job is
SUCCESS (issue 23 item 14): one case per branch; the real worker and Flower are in
test_pipeline.py's Flower test."""

from __future__ import annotations

from capworks.workers.tasks import with_outcome


def test_a_job_with_no_dead_letter_keeps_its_counts_as_they_are() -> None:
    assert with_outcome({"captioned": 4, "dead_lettered": 0, "retrying": 0}) == {
        "captioned": 4,
        "dead_lettered": 0,
        "retrying": 0,
    }
    assert with_outcome({"duplicate": 1}) == {"duplicate": 1}


def test_a_job_whose_images_were_all_dead_lettered_says_so() -> None:
    assert with_outcome({"captioned": 0, "dead_lettered": 3, "retrying": 0})["outcome"] == (
        "all dead-lettered"
    )
    assert with_outcome({"dead_lettered": 2})["outcome"] == "all dead-lettered"  # wrong_model


def test_a_job_with_some_images_captioned_or_retrying_says_some() -> None:
    assert with_outcome({"captioned": 3, "dead_lettered": 1})["outcome"] == "some dead-lettered"
    assert with_outcome({"captioned": 0, "dead_lettered": 1, "retrying": 2})["outcome"] == (
        "some dead-lettered"
    )
