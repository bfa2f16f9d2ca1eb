"""Job messages validate on receipt, and retry backoff is capped, jittered exponential."""

from __future__ import annotations

import json
import random

import pytest

from schema.backoff import compute_backoff
from schema.errors import Code
from schema.jobs import Job, MalformedJob
from schema.uris import ImageRef


def test_job_round_trips_through_its_compact_wire_format() -> None:
    refs = [
        ImageRef(
            "s3://b/a dir/ü+x.jpg",
            bucket="b",
            key="a dir/ü+x.jpg",
            etag="abc",
            size_bytes=12,
            version_id="v1",
        ),
        ImageRef("/tmp/y.png"),
    ]
    job = Job.new(refs, crawl_id="c1")
    again = Job.from_wire(json.loads(json.dumps(job.to_wire())))
    assert again == job


def test_job_message_costs_well_under_200_bytes_per_image() -> None:
    refs = [
        ImageRef(
            f"s3://photos/2024/07/31/IMG_{i:06d}.jpg",
            etag="9b2cf535f27731c974343645a3985328",
            size_bytes=2_345_678,
        )
        for i in range(64)
    ]
    body = json.dumps(Job.new(refs).to_wire())
    assert len(body) / len(refs) < 120


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"v": 2, "id": "x", "images": [["s3://b/k", None, None, None]]},
        {"v": 1, "images": [["s3://b/k", None, None, None]]},
        {"v": 1, "id": "x", "images": []},
        {"v": 1, "id": "x", "images": [["s3://b/k", None, -1, None]]},
        {"v": 1, "id": "x", "images": [["", None, None, None]]},
        {"v": 1, "id": "x", "images": [{"uri": "s3://b/k"}]},
    ],
)
def test_malformed_job_is_rejected_with_a_reason(body: object) -> None:
    with pytest.raises(MalformedJob) as info:
        Job.from_wire(body)
    assert info.value.code is Code.MALFORMED_MESSAGE and info.value.message


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    rng = random.Random(1)
    ceilings = [max(compute_backoff(n, 2.0, 60.0, rng) for _ in range(300)) for n in range(1, 9)]
    assert ceilings[0] <= 2.0 and ceilings[3] <= 16.0 and max(ceilings) <= 60.0
    assert ceilings[5] > 40.0  # capped at 60, reached with jitter
    assert min(compute_backoff(3, 2.0, 60.0, rng) for _ in range(300)) < 1.0  # full jitter


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        compute_backoff(0)
