"""Following the SeaweedFS filer's metadata stream: created objects under `/buckets/` become jobs.

SeaweedFS's S3 server has no bucket notifications; its filer streams every metadata change
(gRPC `SubscribeMetadata`). `weed filer.meta.tail` is the filer's own client of that stream and
prints each change as a JSON object, so the follower runs it as a child process and reads its
output; no gRPC stubs are needed. The S3 ETag is kept in the entry's `Seaweed-X-Amz-ETag`
attribute (multipart ETags included); multipart parts under `.uploads/`, directories and
deletes are ignored.

Position: after each batch is published, the newest event time (`tsNs`) is committed to a
`crawls` row of its own. A restarted follower subscribes from a little before that time and
drops what is not newer, so it neither misses a window nor publishes one twice (a batch cut off
between publishing and committing is absorbed by the sink as duplicates).

What the child prints is read with an incremental UTF-8 decoder (a key's multi-byte character
may be split between two reads). A change that is not JSON, is longer than `max_change_chars`, or
is not the shape of a change is kept in `bad_messages` and the stream goes on; a reader that
fails anyway ends the stream, so the follower subscribes again instead of waiting for ever. A
child that does not exit within `stop_grace_s` of SIGTERM is killed.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from redis import RedisError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from capworks.producer.events.records import (
    MAX_BAD_BODY_CHARS,
    BadRecord,
    ObjectCreated,
)
from capworks.producer.events.sink import EventSink, Outcome
from capworks.producer.imagenames import is_image_name
from capworks.schema.tables import Crawl, utcnow

log = logging.getLogger(__name__)
ETAG_ATTRIBUTE = "Seaweed-X-Amz-ETag"
# Subscribe this long before the stored position: the position is the filer's clock, the "ago"
# this host's; 60 s covers hosts whose clocks disagree by far more than NTP allows, and the sink
# drops every repeat of a version it has published (producer/events/sink.py).
OVERLAP_NS = 60_000_000_000
BATCH_EVENTS = 1000
BATCH_WAIT_S = 0.02
# A change is an entry's metadata (its chunk list included): a few KB, a few MB for a huge file.
MAX_CHANGE_CHARS = 16 * 1024 * 1024
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class FilerChange:
    """One change from the stream: when, and the created object if it is one to caption."""

    ts_ns: int
    created: ObjectCreated | None


def change_from_json(doc: dict[str, Any], path_prefix: str = "/buckets/") -> FilerChange:
    """Read one `SubscribeMetadataResponse` as `weed filer.meta.tail` prints it."""
    ts_ns = int(doc.get("tsNs", 0))
    event = doc.get("eventNotification") or {}
    entry = event.get("newEntry")
    if not isinstance(entry, dict) or entry.get("isDirectory"):
        return FilerChange(ts_ns, None)  # a delete or a directory
    parent = event.get("newParentPath") or doc.get("directory") or ""
    path = f"{parent.rstrip('/')}/{entry.get('name', '')}"
    if not path.startswith(path_prefix):
        return FilerChange(ts_ns, None)
    bucket, _, key = path[len(path_prefix) :].partition("/")
    if not bucket or not key or bucket.startswith(".") or key.startswith(".uploads/"):
        return FilerChange(ts_ns, None)
    if not is_image_name(key):
        return FilerChange(ts_ns, None)
    attributes = entry.get("attributes") or {}
    size = attributes.get("fileSize")
    sized = int(str(size)) if str(size or "").isdigit() else None
    # The change's time is when the filer stored the entry: the upload time a job carries.
    uploaded_s = ts_ns / 1_000_000_000 if ts_ns > 0 else None  # int / int: correctly rounded
    # Its `tsNs` orders it against other writes of the key: an overwrite without an MD5 is new.
    created = ObjectCreated(
        bucket, key, _etag(entry), sized, None, uploaded_s, event_ns=ts_ns if ts_ns > 0 else None
    )
    return FilerChange(ts_ns, created)


def _etag(entry: dict[str, Any]) -> str | None:
    try:
        stored = (entry.get("extended") or {}).get(ETAG_ATTRIBUTE)
        if stored:
            return base64.b64decode(stored).decode("ascii").strip('"') or None
        md5 = (entry.get("attributes") or {}).get("md5")
        return base64.b64decode(md5).hex() if md5 else None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def read_change(doc: dict[str, Any], path_prefix: str = "/buckets/") -> FilerChange | BadRecord:
    """`change_from_json`, or what was wrong with a change that is not the shape it knows."""
    try:
        return change_from_json(doc, path_prefix)
    except (AttributeError, TypeError, ValueError) as exc:
        reason = f"filer change is not a metadata event: {type(exc).__name__}: {exc}"[:300]
        return BadRecord(reason, json.dumps(doc, ensure_ascii=False)[:MAX_BAD_BODY_CHARS])


def iter_json_objects(
    stream: IO[bytes], max_change_chars: int = MAX_CHANGE_CHARS
) -> Iterator[dict[str, Any] | BadRecord]:
    """The JSON objects of a stream of concatenated (pretty-printed) objects, each one that
    cannot be read as a `BadRecord` in its place.

    `weed filer.meta.tail` starts each object on a line of its own ("{" in the first column;
    nested ones are indented, and a JSON string holds no raw newline), so an object that fails
    to parse while the next has begun is broken, not incomplete, and reading resumes there.
    """
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    skipping = False  # inside an over-long object: drop text up to the next object's start
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        buffer += text.decode(chunk)
        while True:
            if skipping:
                following = buffer.find("\n{")
                if following < 0:
                    buffer = buffer[-1:]  # a "\n" whose "{" is still to come
                    break
                buffer, skipping = buffer[following + 1 :], False
            start = buffer.find("{")
            if start < 0:
                buffer = ""
                break
            try:
                doc, end = decoder.raw_decode(buffer, start)
            except ValueError as exc:
                following = buffer.find("\n{", start)
                if following >= 0:
                    reason = f"filer change is not JSON: {exc}"[:300]
                    yield BadRecord(reason, buffer[start:following][:MAX_BAD_BODY_CHARS])
                    buffer = buffer[following + 1 :]
                    continue
                if len(buffer) - start > max_change_chars:
                    reason = f"filer change longer than {max_change_chars} characters: dropped"
                    yield BadRecord(reason, buffer[start : start + 1000])
                    buffer, skipping = buffer[-1:], True
                    break
                buffer = buffer[start:]  # incomplete: wait for more
                break
            buffer = buffer[end:]
            yield doc  # raw_decode from a "{" gives an object


class FilerPosition:
    """The stream position of one follower, kept in a `crawls` row (no migration needed)."""

    def __init__(self, db: Engine, filer: str, path_prefix: str) -> None:
        self._db = db
        digest = hashlib.sha256(f"{filer}|{path_prefix}".encode()).hexdigest()[:16]
        self.row_id = f"events-filer-{digest}"
        self._source = f"filer://{filer}{path_prefix}"

    def load(self) -> int | None:
        """The stored position (ns since the epoch), or None on a first start."""
        with Session(self._db) as session:
            row = session.get(Crawl, self.row_id)
            return int(row.last_key) if row and row.last_key else None

    def save(self, ts_ns: int, published: int) -> None:
        """Commit the position after a batch whose jobs are published."""
        with Session(self._db) as session:
            row = session.get(Crawl, self.row_id)
            if row is None:
                row = Crawl(
                    id=self.row_id,
                    source=self._source,
                    state="running",
                    listed=0,
                    skipped=0,
                    enqueued=0,
                    jobs=0,
                    created=utcnow(),
                )
                session.add(row)
            row.last_key = str(ts_ns)
            row.enqueued = (row.enqueued or 0) + published
            row.jobs = (row.jobs or 0) + published
            row.updated = utcnow()
            session.commit()


class FilerFollower:
    """Follows a filer's metadata stream from the stored position, publishing through a sink."""

    def __init__(
        self,
        weed: str,
        filer: str,
        sink: EventSink,
        position: FilerPosition,
        path_prefix: str = "/buckets/",
        max_change_chars: int = MAX_CHANGE_CHARS,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self._weed = weed
        self._filer = filer
        self._sink = sink
        self._position = position
        self._prefix = path_prefix
        self._max_change_chars = max_change_chars
        self._stop_grace_s = stop_grace_s
        self._job_key = f"events:filer:{filer}{path_prefix}"
        self.published = 0

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Follow until `stop` is set; a stream that ends is subscribed again from the position."""
        since_ns = self._position.load()
        if since_ns is None:  # a first start follows from now on; what came before is a crawl's
            since_ns = time.time_ns()
            self._position.save(since_ns, 0)
        failures = 0
        while not stop.is_set():
            proc = self._subscribe(since_ns)
            changes: queue.Queue[FilerChange | BadRecord | None] = queue.Queue()
            reader = threading.Thread(target=self._read, args=(proc, changes), daemon=True)
            reader.start()
            if ready is not None:
                ready.set()
            try:
                since_ns = self._follow(changes, since_ns, stop)
            except (RedisError, SQLAlchemyError) as exc:  # waited out; the position is safe
                log.error("filer follower: %s", exc)
            finally:
                self._stop_child(proc)
                reader.join(timeout=self._stop_grace_s)
            if not stop.is_set():
                failures += 1
                log.warning("filer stream ended (%s); subscribing again", proc.returncode)
                stop.wait(min(30.0, 0.5 * 2**failures))

    def _subscribe(self, since_ns: int) -> subprocess.Popen[bytes]:
        ago_ns = max(time.time_ns() - since_ns, 0) + OVERLAP_NS
        cmd = [
            self._weed,
            "filer.meta.tail",
            f"-filer={self._filer}",
            f"-pathPrefix={self._prefix}",
            f"-timeAgo={ago_ns}ns",
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # noqa: S603 - the configured weed binary, an argv list

    def _stop_child(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM, then SIGKILL if it has not exited within the grace time; never raises."""
        proc.terminate()
        try:
            proc.wait(timeout=self._stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("filer.meta.tail ignored SIGTERM for %.0f s: killed", self._stop_grace_s)
            proc.kill()
            proc.wait()

    def _read(
        self, proc: subprocess.Popen[bytes], out: queue.Queue[FilerChange | BadRecord | None]
    ) -> None:
        try:
            if proc.stdout is None:  # never: `_subscribe` opens it with stdout=PIPE
                raise RuntimeError("filer.meta.tail was started without a pipe to read")
            for item in iter_json_objects(proc.stdout, self._max_change_chars):
                out.put(item if isinstance(item, BadRecord) else read_change(item, self._prefix))
        except Exception:  # a reader that dies silently would stall the follower for ever
            log.exception("filer follower: reading the stream failed; subscribing again")
        finally:
            out.put(None)  # the stream ended

    def _follow(
        self,
        changes: queue.Queue[FilerChange | BadRecord | None],
        since_ns: int,
        stop: threading.Event,
    ) -> int:
        while not stop.is_set():
            try:
                first = changes.get(timeout=0.2)
            except queue.Empty:
                continue
            if first is None:
                return since_ns
            batch = [first]
            deadline = time.monotonic() + BATCH_WAIT_S
            while len(batch) < BATCH_EVENTS:
                try:
                    item = changes.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    changes.put(None)
                    break
                batch.append(item)
            since_ns = self._publish(batch, since_ns, stop)
        return since_ns

    def _publish(
        self, batch: list[FilerChange | BadRecord], since_ns: int, stop: threading.Event
    ) -> int:
        bad = [c for c in batch if isinstance(c, BadRecord)]
        if bad:
            self._sink.record_bad(self._job_key, bad)
        fresh = [c for c in batch if isinstance(c, FilerChange) and c.ts_ns > since_ns]
        if not fresh:
            return since_ns
        created = [c.created for c in fresh if c.created is not None]
        outcomes = self._sink.publish(created)
        while Outcome.IN_FLIGHT in outcomes:  # another follower, or a killed run's claim
            if stop.wait(1.0):
                return since_ns  # not past what is unpublished: the next run starts before it
            outcomes = self._sink.publish(created)
        published = outcomes.count(Outcome.PUBLISHED)
        self.published += published
        newest = max(c.ts_ns for c in fresh)
        self._position.save(newest, published)
        return newest
