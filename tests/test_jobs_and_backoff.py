"""Job messages validate on receipt, and retry backoff is capped, jittered exponential."""

from __future__ import annotations

import base64
import json
import random
import uuid

import pytest
import redis
from conftest import require_service
from pipeline_support import REDIS_URL

from capworks.producer.crawl import SENT_KEY
from capworks.producer.enqueue import make_publisher
from capworks.schema.backoff import compute_backoff
from capworks.schema.errors import Code
from capworks.schema.jobs import Job, MalformedJob
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef


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
    for_model = Job.new(refs, model=("damo/ofa", "v1.0.1", "0123abcd"))
    assert Job.from_wire(json.loads(json.dumps(for_model.to_wire()))) == for_model
    retry = for_model.derived(refs[:1], "x.r1-abc")
    assert (retry.model, retry.crawl_id, retry.images) == (for_model.model, None, (refs[0],))


def test_a_queued_64_image_job_costs_redis_under_200_bytes_per_image() -> None:
    # What Redis holds for one job of a crawl: the queue's list entry (the job's JSON inside
    # Celery's envelope, base64-encoded) and the job's sent mark, as MEMORY USAGE counts them.
    queue = f"capworks-test-size-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.ConnectionError as exc:
        require_service("Redis", str(exc))
    crawl_id = uuid.uuid4().hex[:16]
    refs = [
        ImageRef(
            f"s3://photos/2024/07/31/IMG_{i:06d}.jpg",
            bucket="photos",
            key=f"2024/07/31/IMG_{i:06d}.jpg",
            etag=uuid.uuid4().hex,
            size_bytes=2_345_678 + 7_919 * i,
        )
        for i in range(64)
    ]
    job = Job.new(refs, crawl_id, job_id=f"{crawl_id}-{uuid.uuid4().hex[:8]}-000000")
    publisher = make_publisher(Settings(broker_url=REDIS_URL, queue_name=queue))
    try:
        publisher.publish(job)
        entries = r.lrange(queue, 0, -1)
        sent_mark = SENT_KEY.format(job.job_id)
        stored_bytes = int(r.memory_usage(queue, samples=0) or 0)
        stored_bytes += int(r.memory_usage(sent_mark, samples=0) or 0)
    finally:
        r.delete(queue, SENT_KEY.format(job.job_id), *r.scan_iter(f"_kombu.binding*.{queue}"))
        publisher.redis.close()
        r.close()
    assert len(entries) == 1
    envelope = json.loads(entries[0])
    args, _, _ = json.loads(base64.b64decode(envelope["body"]))
    assert Job.from_wire(args[0]) == job  # the entry is this job, as a worker will read it
    assert len(entries[0]) < stored_bytes
    assert stored_bytes / len(refs) < 200, f"{stored_bytes / len(refs):.1f} bytes per image"


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
        {"v": 1, "id": "x", "images": [["s3://b/k", None, None, None]], "model": "shapes"},
        {"v": 1, "id": "x", "images": [["s3://b/k", None, None, None]], "model": ["a", 1, "h"]},
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
