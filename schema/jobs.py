"""Job messages: a versioned, validated chunk of image references for one Celery task.

On the wire a job is compact JSON: `{"v": 1, "id": ..., "crawl": ..., "images": [[uri, etag,
size, version_id], ...]}`; bucket and key are derived from `s3://` URIs. One message carries many
images because Celery costs about 1 ms per message: one message per image caps a crawl near
1,000 images/s.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schema.errors import CapworksError, Code
from schema.uris import ImageRef, is_s3, parse_s3

JOB_VERSION = 1
MAX_IMAGES_PER_JOB = 1000
MAX_ROOT_ID_CHARS = 96  # a derived id adds at most 20 characters; the column holds 128


def new_job_id() -> str:
    """A job id never used before (random, 128 bits)."""
    return uuid.uuid4().hex


def derived_job_id(parent: str, kind: str, attempt: int) -> str:
    """The id of a job made from another (`r` transient retry, `a` whole-job retry, `s` split).

    Unique for ever: a parent that runs twice (delivered again before it was marked done) makes
    two derived jobs, and a done mark of one never drops the other. The parent's root id is kept
    for tracing; derived suffixes do not pile up, so ids stay short.
    """
    root = parent.split(".", 1)[0].split("~", 1)[0][:MAX_ROOT_ID_CHARS]
    return f"{root}.{kind}{attempt}-{uuid.uuid4().hex[:12]}"


class MalformedJob(CapworksError):
    """A job message that does not validate; it is dead-lettered, never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.MALFORMED_MESSAGE, message)


@dataclass(frozen=True)
class Job:
    """A chunk of image references to caption."""

    job_id: str
    images: tuple[ImageRef, ...]
    crawl_id: str | None = None

    @classmethod
    def new(
        cls, images: Sequence[ImageRef], crawl_id: str | None = None, job_id: str | None = None
    ) -> Job:
        """A job with a fresh id unless one is given (crawls use deterministic ids)."""
        return cls(job_id or new_job_id(), tuple(images), crawl_id)

    def to_wire(self) -> dict[str, Any]:
        """The compact JSON-able message body."""
        return {
            "v": JOB_VERSION,
            "id": self.job_id,
            "crawl": self.crawl_id,
            "images": [[r.uri, r.etag, r.size_bytes, r.version_id] for r in self.images],
        }

    @classmethod
    def from_wire(cls, body: Any) -> Job:
        """Validate a received message body; raise `MalformedJob` with the reason."""
        if not isinstance(body, dict):
            raise MalformedJob(f"job body is {type(body).__name__}, not an object")
        if body.get("v") != JOB_VERSION:
            raise MalformedJob(f"unsupported job version {body.get('v')!r} (want {JOB_VERSION})")
        job_id, crawl, images = body.get("id"), body.get("crawl"), body.get("images")
        if not isinstance(job_id, str) or not job_id:
            raise MalformedJob("job id missing")
        if crawl is not None and not isinstance(crawl, str):
            raise MalformedJob("crawl id is not a string")
        if not isinstance(images, list) or not 0 < len(images) <= MAX_IMAGES_PER_JOB:
            raise MalformedJob(f"images must be a list of 1..{MAX_IMAGES_PER_JOB} entries")
        return cls(job_id, tuple(_image_from_wire(item) for item in images), crawl)


def _image_from_wire(item: Any) -> ImageRef:
    if not isinstance(item, list) or len(item) != 4:
        raise MalformedJob(f"image entry {item!r} is not [uri, etag, size, version]")
    uri, etag, size, version = item
    if not isinstance(uri, str) or not uri:
        raise MalformedJob(f"image uri {uri!r} is not a string")
    if etag is not None and not isinstance(etag, str):
        raise MalformedJob(f"etag {etag!r} is not a string")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MalformedJob(f"size {size!r} is not a byte count")
    if version is not None and not isinstance(version, str):
        raise MalformedJob(f"version {version!r} is not a string")
    bucket = key = None
    if is_s3(uri):
        loc = parse_s3(uri)
        bucket, key = loc.bucket, loc.key
    return ImageRef(uri=uri, bucket=bucket, key=key, version_id=version, etag=etag, size_bytes=size)
