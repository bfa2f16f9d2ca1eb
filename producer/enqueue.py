"""Publishing jobs: the Python API for upload hooks, and the crawl set-up for `capworks enqueue`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from producer.crawl import Publisher
from schema.jobs import Job
from schema.queue import CAPTION_TASK, make_celery
from schema.settings import Settings, get_settings
from schema.uris import ImageRef, is_s3, parse_s3


def make_publisher(settings: Settings) -> Publisher:
    """A publisher on the configured broker."""
    app = make_celery(settings)

    def send(body: dict[str, Any]) -> None:
        app.send_task(CAPTION_TASK, args=[body], queue=settings.queue_name)

    return Publisher(
        send, redis.Redis.from_url(settings.broker_url), settings.queue_name, settings.job_images
    )


def enqueue(
    images: Iterable[str | ImageRef],
    settings: Settings | None = None,
    publisher: Publisher | None = None,
) -> list[str]:
    """Enqueue images now (e.g. from an upload hook), `job_images` per job; returns the job ids."""
    settings = settings or get_settings()
    publisher = publisher or make_publisher(settings)
    refs = [to_ref(i) for i in images]
    job_ids = []
    for start in range(0, len(refs), settings.job_images):
        job = Job.new(refs[start : start + settings.job_images])
        publisher.publish(job)
        job_ids.append(job.job_id)
    return job_ids


def to_ref(image: str | ImageRef) -> ImageRef:
    """A reference for a URI string (bucket and key filled in for `s3://`)."""
    if isinstance(image, ImageRef):
        return image
    if is_s3(image):
        loc = parse_s3(image)
        return ImageRef(uri=image, bucket=loc.bucket, key=loc.key)
    return ImageRef(uri=image)
