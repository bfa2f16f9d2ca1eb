"""Storage event notifications parsed into created objects: the S3 `Records[]` shape (AWS, MinIO,
Ceph), EventBridge "Object Created" events, and either one wrapped in an SNS notification.

Only object-created events for image-like keys become work; the AWS `s3:TestEvent`, deletes and
other keys are counted as ignored. Keys of `Records[]` are form-encoded ("red+flower.jpg") and
are decoded; EventBridge keys arrive as they are. A record that names no bucket or key, or a key
the database cannot hold, is bad: it is reported with the reason and its neighbours go on.

The event's time (`eventTime` of a record, `time` of an EventBridge event) is kept as the upload
time that jobs carry for the workers' upload -> caption latency; a missing or unreadable time
leaves it out and the object is captioned all the same.

What orders two announcements of one key is kept too: the record's `sequencer` (hex, AWS and
MinIO; EventBridge has it under `detail.object`) and the event time in nanoseconds. The sink
captions the latest version of an object by them (`producer/events/versions.py`).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

from capworks.producer.crawl import unstorable_reason
from capworks.producer.imagenames import is_image_name
from capworks.schema.errors import CapworksError, Code
from capworks.schema.jobs import MAX_KEY_CHARS, MAX_TAG_CHARS, escaped
from capworks.schema.uris import ImageRef, s3_uri

MAX_BAD_BODY_CHARS = 10_000
MAX_SEQUENCER_CHARS = 64  # AWS sends 18 hex digits
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MalformedEvent(CapworksError):
    """A body that is not an event notification at all (not JSON, no known shape)."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.MALFORMED_MESSAGE, message)


@dataclass(frozen=True)
class ObjectCreated:
    """A new (or overwritten) object that should be captioned."""

    bucket: str
    key: str
    etag: str | None = None
    size_bytes: int | None = None
    version_id: str | None = None
    # When it was uploaded (Unix seconds), where the event says; two deliveries of one object
    # version are the same object whatever times they carry.
    upload_time_s: float | None = field(default=None, compare=False)
    # What orders announcements of one key (S3's hex `sequencer`, the event time in ns): two
    # deliveries of one version carry the same, and they are left out of equality like the time.
    sequencer: str | None = field(default=None, compare=False)
    event_ns: int | None = field(default=None, compare=False)

    @property
    def uri(self) -> str:
        """The object's `s3://` URI."""
        return s3_uri(self.bucket, self.key)

    def ref(self) -> ImageRef:
        """The image reference a job carries."""
        return ImageRef(
            uri=self.uri,
            bucket=self.bucket,
            key=self.key,
            version_id=self.version_id,
            etag=self.etag,
            size_bytes=self.size_bytes,
        )


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be used, and why (kept in `bad_messages`)."""

    reason: str
    body: str


@dataclass
class Parsed:
    """What one notification body held."""

    created: list[ObjectCreated] = field(default_factory=list)
    ignored: int = 0
    bad: list[BadRecord] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        """Add another body's results to these."""
        self.created.extend(other.created)
        self.ignored += other.ignored
        self.bad.extend(other.bad)


def parse_body(raw: bytes | str) -> Parsed:
    """Parse one notification body (JSON text); raises `MalformedEvent` for anything that is not
    JSON or not an event shape capworks knows."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}"[:300]) from None
    return parse_document(doc)


def parse_document(doc: Any) -> Parsed:
    """Parse a decoded notification: `Records[]`, EventBridge, SNS-wrapped, or the test event."""
    if not isinstance(doc, dict):
        raise MalformedEvent(f"notification is a JSON {type(doc).__name__}, not an object")
    if doc.get("Event") == "s3:TestEvent":
        return Parsed(ignored=1)
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return parse_body(doc["Message"])  # SNS: the S3 or EventBridge event is a JSON string
    if "Records" in doc:
        records = doc["Records"]
        if not isinstance(records, list):
            raise MalformedEvent("Records is not a list")
        parsed = Parsed()
        for record in records:
            parsed.extend(_s3_record(record))
        return parsed
    if "detail-type" in doc and "detail" in doc:
        return _eventbridge(doc)
    raise MalformedEvent("not an S3 event notification (no Records, detail-type or SNS Message)")


def _s3_record(record: Any) -> Parsed:
    if not isinstance(record, dict):
        return _bad(f"record is a JSON {type(record).__name__}, not an object", record)
    name = record.get("eventName")
    if not isinstance(name, str):
        return _bad("record has no eventName", record)
    # AWS and Ceph: "ObjectCreated:Put"; MinIO: "s3:ObjectCreated:Put".
    if not name.removeprefix("s3:").startswith("ObjectCreated:"):
        return Parsed(ignored=1)
    s3 = record.get("s3")
    bucket = _dig(s3, "bucket", "name")
    raw_key = _dig(s3, "object", "key")
    if not isinstance(bucket, str) or not bucket or not isinstance(raw_key, str) or not raw_key:
        return _bad("record names no bucket or object key", record)
    try:
        key = unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        return _bad(f"object key {raw_key!r} is not URL-encoded UTF-8", record)
    obj: dict[str, Any] = _dig(s3, "object")
    return _created(
        bucket,
        key,
        obj.get("eTag") or obj.get("etag"),
        obj.get("size"),
        obj.get("versionId"),
        record,
        event_time_ns(record.get("eventTime")),
        obj.get("sequencer"),
    )


def _eventbridge(doc: dict[str, Any]) -> Parsed:
    if doc.get("detail-type") != "Object Created":
        return Parsed(ignored=1)  # "Object Deleted", "Object Restore Completed", ...
    detail = doc["detail"]
    bucket = _dig(detail, "bucket", "name")
    key = _dig(detail, "object", "key")
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
        return _bad("EventBridge event names no bucket or object key", doc)
    obj = detail["object"]
    return _created(
        bucket,
        key,
        obj.get("etag"),
        obj.get("size"),
        obj.get("version-id"),
        doc,
        event_time_ns(doc.get("time")),
        obj.get("sequencer"),
    )


def event_time_s(value: Any) -> float | None:
    """An event's ISO 8601 time ("2026-12-02T06:00:00.000Z") as Unix seconds; a time without a
    zone is UTC (as S3 and EventBridge send it); None when missing, unreadable or before 1970
    (a job's upload time is never negative)."""
    ns = event_time_ns(value)
    return ns / 1_000_000_000 if ns is not None else None  # int / int: correctly rounded


def event_time_ns(value: Any) -> int | None:
    """An event's ISO 8601 time as whole nanoseconds since 1970 (exact: no float between), read
    as `event_time_s` reads it."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ns = (when - EPOCH) // timedelta(microseconds=1) * 1000
    return ns if ns >= 0 else None


def sequencer_of(value: Any) -> str | None:
    """A record's `sequencer` in upper case; None when missing or not a short hex string (it is
    optional: moto sends none)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SEQUENCER_CHARS:
        return None
    return value.upper() if all(c in string.hexdigits for c in value) else None


def _created(
    bucket: str,
    key: str,
    etag: Any,
    size: Any,
    version: Any,
    source: Any,
    event_ns: int | None = None,
    sequencer: Any = None,
) -> Parsed:
    if not is_image_name(key):  # the crawl's suffix policy (producer/imagenames.py)
        return Parsed(ignored=1)
    uri = s3_uri(bucket, key)
    reason = unstorable_reason(uri)
    if reason is None and (len(key) > MAX_KEY_CHARS or len(bucket) > MAX_TAG_CHARS):
        reason = f"bucket or key too long ({len(bucket)}, {len(key)} characters)"
    if reason is None:
        for what, value in (("eTag", etag), ("versionId", version)):
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TAG_CHARS):
                reason = f"{what} {value!r} is not a string of up to {MAX_TAG_CHARS}"[:300]
    if reason is not None:
        return _bad(reason, source)
    sized = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    return Parsed(
        created=[
            ObjectCreated(
                bucket,
                key,
                (etag or "").strip('"') or None,
                sized,
                version or None,
                event_ns / 1_000_000_000 if event_ns is not None else None,
                sequencer_of(sequencer),
                event_ns,
            )
        ]
    )


def _dig(doc: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(name)
    return doc


def _bad(reason: str, record: Any) -> Parsed:
    try:
        body = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError):
        body = repr(record)
    return Parsed(bad=[BadRecord(reason, escaped(body)[:MAX_BAD_BODY_CHARS])])
