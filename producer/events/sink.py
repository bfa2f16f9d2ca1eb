"""Where every event source hands its objects: duplicates absorbed in Redis, one single-image
job published per new object, bad records kept in `bad_messages`.

Duplicate absorption is keyed on bucket + key + ETag + the model identity (model, revision,
generation settings). A key is first *claimed* (`SET NX GET` with a short TTL), the job is
published, then the key is marked *sent* for `dedup_ttl_s`. So a delivery that arrives while
another is publishing the same object is told `IN_FLIGHT` (its source retries it later instead of
dropping it), a delivery after the publish is a `DUPLICATE`, and a consumer killed between claim
and publish leaves only a claim that expires, after which a redelivery publishes. The workers'
upsert of `images`/`captions` is idempotent, so even a job sent twice makes one caption row.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, insert, select

from producer.crawl import Publisher
from producer.events.records import BadRecord, ObjectCreated
from schema.jobs import Job, escaped
from schema.redact import redact
from schema.tables import BadMessage, utcnow

log = logging.getLogger(__name__)
DEDUP_KEY = "capworks:event:{}"
CLAIM = b"claim"
SENT = b"sent"
MAX_BODY_CHARS = 10_000


class Outcome(enum.Enum):
    """What became of one created object."""

    PUBLISHED = "published"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"  # another delivery is publishing it right now: try again later


def dedup_key(event: ObjectCreated, identity: tuple[str, str, str]) -> str:
    """The Redis key of one object version for one model identity."""
    blob = json.dumps([event.bucket, event.key, event.etag, *identity], ensure_ascii=False)
    return DEDUP_KEY.format(hashlib.sha256(blob.encode()).hexdigest()[:32])


def one_by_one(publisher: Publisher) -> Callable[[Sequence[Job]], None]:
    """A `send` for `EventSink` through the crawl's publisher: one `send_task` per job."""

    def send(jobs: Sequence[Job]) -> None:
        for job in jobs:
            publisher.publish(job)

    return send


def record_bad_records(db: Engine, job_key: str, bad: Sequence[BadRecord]) -> None:
    """Keep records that could not be used in `bad_messages`, one row each."""
    if not bad:
        return
    key = escaped(job_key)[:256]
    bodies = {redact(escaped(b.body))[:MAX_BODY_CHARS]: b for b in bad}
    with db.begin() as conn:
        # A message received again (SQS redelivery, a sender's retry) adds no second row.
        known = set(
            conn.scalars(
                select(BadMessage.body).where(
                    BadMessage.job_key == key, BadMessage.body.in_(list(bodies))
                )
            )
        )
        rows = [
            {
                "job_key": key,
                "reason": redact(escaped(b.reason)),
                "body": body,
                "received": utcnow(),
            }
            for body, b in bodies.items()
            if body not in known
        ]
        if rows:
            conn.execute(insert(BadMessage), rows)
    for b in bad:
        log.warning("bad event from %s: %s (kept in bad_messages)", job_key, b.reason)


class EventSink:
    """Publishes a single-image job per new object, at most once per object version and model."""

    def __init__(
        self,
        send: Callable[[Sequence[Job]], None],
        redis: Any,
        identity: tuple[str, str, str],
        db: Engine,
        dedup_ttl_s: int = 7 * 24 * 3600,
        claim_ttl_s: int = 60,
    ) -> None:
        self._send = send
        self._redis = redis
        self._identity = identity
        self.db = db
        self._dedup_ttl_s = dedup_ttl_s
        self._claim_ttl_s = claim_ttl_s

    def publish(self, events: Sequence[ObjectCreated]) -> list[Outcome]:
        """Publish what is new among `events` (one outcome each, in order). Raises what the
        broker raised; then nothing of this call stays claimed, so a retry publishes it."""
        keys = [dedup_key(e, self._identity) for e in events]
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        pipe = self._redis.pipeline(transaction=False)
        for key in first:
            pipe.set(key, CLAIM, nx=True, ex=self._claim_ttl_s, get=True)
        before = dict(zip(first, pipe.execute(), strict=True))
        claimed = [k for k, old in before.items() if old is None]
        jobs = [self._job(events[first[k]]) for k in claimed]
        try:
            self._send(jobs)
        except BaseException:
            if claimed:  # a retry must publish these: leave no claim behind
                self._redis.delete(*claimed)
            raise
        if claimed:
            pipe = self._redis.pipeline(transaction=False)
            for key in claimed:
                pipe.set(key, SENT, ex=self._dedup_ttl_s)
            pipe.execute()
        outcomes = []
        for index, key in enumerate(keys):
            old = before[key]
            if first[key] != index or (old is not None and old == SENT):
                outcomes.append(Outcome.DUPLICATE)
            elif old is None:
                outcomes.append(Outcome.PUBLISHED)
            else:
                outcomes.append(Outcome.IN_FLIGHT)
        return outcomes

    def _job(self, event: ObjectCreated) -> Job:
        """The single-image job of one object: for this model, with its upload time."""
        return Job.new([event.ref()], model=self._identity, upload_time_s=event.upload_time_s)

    def record_bad(self, job_key: str, bad: Sequence[BadRecord]) -> None:
        """Keep unusable records in `bad_messages`."""
        record_bad_records(self.db, job_key, bad)
