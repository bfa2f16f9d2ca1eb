"""Job messages: a versioned, validated chunk of image references for one Celery task.

On the wire a job is compact JSON: `{"v": 1, "id": ..., "crawl": ..., "images": [[uri, etag,
size, version_id], ...]}`; bucket and key are derived from `s3://` URIs. One message carries many
images because Celery costs about 1 ms per message: one message per image caps a crawl near
1,000 images/s.

Optional fields are added without a new version, so that workers of either side of a rolling
upgrade read each other's messages (an unknown field is ignored; a known one must be well
formed): `model` (the caption identity) and `uploaded` (when the job's objects were uploaded,
Unix seconds, from a storage event; a crawl's jobs have none).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capworks.schema.errors import CapworksError, Code
from capworks.schema.uris import ImageRef, is_s3, parse_s3

JOB_VERSION = 1
MAX_IMAGES_PER_JOB = 1000
MAX_ROOT_ID_CHARS = 96  # a derived id adds at most 20 characters; the column holds 128
# What the database columns hold (schema/tables.py): an entry beyond them fails alone.
MAX_JOB_ID_CHARS = 128
MAX_URI_CHARS = 2048
MAX_KEY_CHARS = 1024
MAX_TAG_CHARS = 255  # bucket, ETag, version id
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


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
    # The caption identity (model id, revision, generation settings hash) the producer deduped
    # against; a worker serving another identity does not caption the job under its own.
    model: tuple[str, str, str] | None = None
    # When the job's objects were uploaded (Unix time, seconds), as a storage event reported it;
    # the worker observes upload -> caption latency from it. None for crawled images.
    upload_time_s: float | None = None

    @classmethod
    def new(
        cls,
        images: Sequence[ImageRef],
        crawl_id: str | None = None,
        job_id: str | None = None,
        model: tuple[str, str, str] | None = None,
        upload_time_s: float | None = None,
    ) -> Job:
        """A job with a fresh id unless one is given (crawls use deterministic ids)."""
        return cls(job_id or new_job_id(), tuple(images), crawl_id, model, upload_time_s)

    def derived(self, images: Sequence[ImageRef], job_id: str) -> Job:
        """A job made from this one (a retry, a split): same crawl, model identity and upload
        time (a retried image's latency runs from its upload to its final caption)."""
        return Job(job_id, tuple(images), self.crawl_id, self.model, self.upload_time_s)

    def to_wire(self) -> dict[str, Any]:
        """The compact JSON-able message body."""
        body: dict[str, Any] = {
            "v": JOB_VERSION,
            "id": self.job_id,
            "crawl": self.crawl_id,
            "images": [[r.uri, r.etag, r.size_bytes, r.version_id] for r in self.images],
        }
        if self.model is not None:
            body["model"] = list(self.model)
        if self.upload_time_s is not None:
            body["uploaded"] = self.upload_time_s
        return body

    @classmethod
    def from_wire(cls, body: Any, rejected: list[RejectedImage] | None = None) -> Job:
        """Validate a received message body; raise `MalformedJob` with the reason.

        With `rejected` given, an image entry the database could not store (or that is not an
        image reference at all) is appended there and left out, instead of failing the job.
        """
        if not isinstance(body, dict):
            raise MalformedJob(f"job body is {type(body).__name__}, not an object")
        if body.get("v") != JOB_VERSION:
            raise MalformedJob(f"unsupported job version {body.get('v')!r} (want {JOB_VERSION})")
        job_id, crawl, images = body.get("id"), body.get("crawl"), body.get("images")
        if not isinstance(job_id, str) or not job_id:
            raise MalformedJob("job id missing")
        _check_text("job id", job_id, MAX_JOB_ID_CHARS)
        if crawl is not None:
            if not isinstance(crawl, str):
                raise MalformedJob("crawl id is not a string")
            _check_text("crawl id", crawl, MAX_JOB_ID_CHARS)
        if not isinstance(images, list) or not 0 < len(images) <= MAX_IMAGES_PER_JOB:
            raise MalformedJob(f"images must be a list of 1..{MAX_IMAGES_PER_JOB} entries")
        refs = []
        for index, item in enumerate(images):
            try:
                refs.append(_image_from_wire(item))
            except MalformedJob as exc:
                if rejected is None:
                    raise
                rejected.append(RejectedImage(index, item, exc.message))
        if not refs:  # every entry was rejected (with `rejected` None the first one raised)
            raise MalformedJob(f"no usable image entry; first: {(rejected or [])[0].reason}")
        model = _model_from_wire(body.get("model"))
        return cls(job_id, tuple(refs), crawl, model, _upload_time_from_wire(body.get("uploaded")))


def _model_from_wire(model: Any) -> tuple[str, str, str] | None:
    """A job's caption identity: absent (any model may caption it) or three strings."""
    if model is None:
        return None
    if not (isinstance(model, list) and len(model) == 3 and all(isinstance(m, str) for m in model)):
        raise MalformedJob("model must be [model id, revision, settings hash]")
    for name, value in zip(("model id", "revision", "settings hash"), model, strict=True):
        _check_text(name, value, MAX_KEY_CHARS)
    return (model[0], model[1], model[2])


def _upload_time_from_wire(uploaded: Any) -> float | None:
    """A job's upload time: absent, or a finite, non-negative number of Unix seconds.

    A time in the future is kept: whether it is too far ahead depends on the receiving clock, and
    validation gives every worker and every redelivery the same verdict (the worker's metric
    leaves such a time out, `capworks.workers.metrics.upload_latency_s`).
    """
    if uploaded is None:
        return None
    # NaN and infinities fail the range check too (JSON from Python may carry them).
    if (
        not isinstance(uploaded, int | float)
        or isinstance(uploaded, bool)
        or not 0 <= uploaded < 2**63
    ):
        raise MalformedJob(f"uploaded {uploaded!r} is not a Unix time in seconds"[:500])
    return float(uploaded)


@dataclass(frozen=True)
class RejectedImage:
    """An image entry of a job that was left out, and why (kept in `bad_messages`)."""

    index: int
    entry: Any
    reason: str


@dataclass(frozen=True)
class Received:
    """A validated task message: the job, its attempt number, and the entries left out."""

    job: Job
    attempt: int
    rejected: tuple[RejectedImage, ...]


def parse_message(args: Sequence[Any], kwargs: dict[str, Any]) -> Received:
    """Validate a caption task's arguments (`body`, optional `attempt`) as they arrived.

    Raises `MalformedJob` with the reason for anything that is not a job; never anything else.
    """
    try:
        size_bytes = len(json.dumps([args, kwargs], default=repr))
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedJob(f"message is not JSON-like: {type(exc).__name__}") from None
    if size_bytes > MAX_MESSAGE_BYTES:
        raise MalformedJob(f"message is {size_bytes} bytes; at most {MAX_MESSAGE_BYTES}")
    unknown = set(kwargs) - {"body", "attempt"}
    if unknown:
        raise MalformedJob(f"unexpected task arguments {sorted(unknown)!r}")
    names = ("body", "attempt")
    if len(args) > len(names) or any(n in kwargs for n in names[: len(args)]):
        raise MalformedJob(f"task takes (body, attempt=1); got {len(args)} positional arguments")
    given = dict(zip(names, args, strict=False)) | kwargs
    if "body" not in given:
        raise MalformedJob("task message has no job body")
    attempt = given.get("attempt", 1)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= 10_000:
        raise MalformedJob(f"attempt {attempt!r} is not a number from 1 to 10000")
    rejected: list[RejectedImage] = []
    job = Job.from_wire(given["body"], rejected)
    return Received(job, attempt, tuple(rejected))


def unstorable(text: str) -> str | None:
    """Why the database cannot store `text` (NUL, not valid UTF-8), or None when it can."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def escaped(text: str) -> str:
    """`text` as the database can store it: NUL as `\\x00`, the bytes of a name that was not
    UTF-8 (surrogate escapes) as `\\xNN`, any other lone surrogate as `\\udNNN`."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name gives (a JSON "\\ud800")
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def _check_text(what: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise MalformedJob(f"{what} is {len(text)} characters; at most {max_chars}")
    problem = unstorable(text)
    if problem:
        raise MalformedJob(f"{what} {text!r} {problem}")


def _image_from_wire(item: Any) -> ImageRef:
    if not isinstance(item, list) or len(item) != 4:
        raise MalformedJob(f"image entry {item!r} is not [uri, etag, size, version]"[:500])
    uri, etag, size, version = item
    if not isinstance(uri, str) or not uri:
        raise MalformedJob(f"image uri {uri!r} is not a string"[:500])
    _check_text("image uri", uri, MAX_URI_CHARS)
    if etag is not None:
        if not isinstance(etag, str):
            raise MalformedJob(f"etag {etag!r} is not a string"[:500])
        _check_text("etag", etag, MAX_TAG_CHARS)
    if size is not None and (
        not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63
    ):
        raise MalformedJob(f"size {size!r} is not a byte count"[:500])
    if version is not None:
        if not isinstance(version, str):
            raise MalformedJob(f"version {version!r} is not a string"[:500])
        _check_text("version", version, MAX_TAG_CHARS)
    bucket = key = None
    if is_s3(uri):
        try:
            loc = parse_s3(uri)
        except CapworksError as exc:
            raise MalformedJob(exc.message) from None
        if not loc.key or len(loc.bucket) > MAX_TAG_CHARS or len(loc.key) > MAX_KEY_CHARS:
            raise MalformedJob(f"{uri!r} names no object (bucket up to 255, key 1..1024)"[:500])
        bucket, key = loc.bucket, loc.key
    return ImageRef(uri=uri, bucket=bucket, key=key, version_id=version, etag=etag, size_bytes=size)
