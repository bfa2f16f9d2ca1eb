"""Where every event source hands its objects: each object published at its latest version,
one single-image job per new version, bad records kept in `bad_messages`.

Per object (bucket + key) and model identity (model, revision, generation settings) Redis keeps
the *latest* version published (`producer/events/versions.py` says which of two is newer), for
`dedup_ttl_s`. An announcement is a `DUPLICATE` only if it names that version again or an older
one; a re-upload of earlier content (A -> B -> A) and an overwrite without an ETag are published.

Publishing an object first *claims* it (`SET NX GET` of a per-object claim with a short TTL),
then publishes, then makes its version the latest, only if the claim is still its own. So a
delivery that arrives while another is publishing the same object is told `IN_FLIGHT` (its
source retries it later, and it is then judged against what was published), and a consumer
killed between claim and publish leaves only a claim that expires. Within one call only the
newest announcement of an object is published; the older ones are duplicates. The workers'
upsert of `images`/`captions` is idempotent, so even a job sent twice makes one caption row.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, insert, select

from capworks.producer.crawl import Publisher
from capworks.producer.events.records import BadRecord, ObjectCreated
from capworks.producer.events.versions import Order, Version, compare_versions
from capworks.producer.replicas import wait_for_replicas
from capworks.schema.jobs import Job, escaped
from capworks.schema.redact import redact
from capworks.schema.tables import BadMessage, utcnow

log = logging.getLogger(__name__)
LATEST_KEY = "capworks:event:latest:{}"
CLAIM_KEY = "capworks:event:claim:{}"
MAX_BODY_CHARS = 10_000
# The latest version becomes ours only while the claim is: a claim that expired mid-publish may
# have let another consumer publish a newer version since.
COMMIT_IF_CLAIMED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""
RELEASE_IF_CLAIMED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Outcome(enum.Enum):
    """What became of one created object."""

    PUBLISHED = "published"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"  # another delivery is publishing it right now: try again later


def object_digest(event: ObjectCreated, identity: tuple[str, str, str]) -> str:
    """What names one object for one model identity in the sink's Redis keys."""
    blob = json.dumps([event.bucket, event.key, *identity], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def newest_of_each(events: Sequence[ObjectCreated], digests: Sequence[str]) -> dict[str, int]:
    """Per object, the index of its newest announcement among `events` (a repeat keeps the
    first; the later one where nothing orders two)."""
    newest: dict[str, int] = {}
    for index, digest in enumerate(digests):
        best = newest.get(digest)
        if best is None or (
            compare_versions(Version.of(events[index]), Version.of(events[best])) is Order.NEWER
        ):
            newest[digest] = index
    return newest


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
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._send = send
        self._redis = redis
        self._identity = identity
        self.db = db
        self._dedup_ttl_s = dedup_ttl_s
        self._claim_ttl_s = claim_ttl_s
        self._wait_replicas = wait_replicas  # 0: do not wait (producer/replicas.py)
        self._wait_timeout_ms = wait_timeout_ms
        self._commit_if_claimed = redis.register_script(COMMIT_IF_CLAIMED)
        self._release_if_claimed = redis.register_script(RELEASE_IF_CLAIMED)

    def publish(self, events: Sequence[ObjectCreated]) -> list[Outcome]:
        """Publish what is new among `events` (one outcome each, in order). Raises what the
        broker raised; then nothing of this call stays claimed, so a retry publishes it."""
        digests = [object_digest(e, self._identity) for e in events]
        newest = newest_of_each(events, digests)
        token = uuid.uuid4().hex.encode()
        pipe = self._redis.pipeline(transaction=False)
        for digest in newest:
            pipe.set(CLAIM_KEY.format(digest), token, nx=True, ex=self._claim_ttl_s, get=True)
            pipe.get(LATEST_KEY.format(digest))  # read after the claim: only a claimer changes it
        replies = pipe.execute()
        decided: dict[str, Outcome] = {}
        claimed: list[str] = []
        for n, digest in enumerate(newest):
            holder, stored = replies[2 * n], replies[2 * n + 1]
            latest = Version.from_json(stored) if stored is not None else None
            event = Version.of(events[newest[digest]])
            if holder is None:
                claimed.append(digest)
            if latest is not None and compare_versions(event, latest) is not Order.NEWER:
                decided[digest] = Outcome.DUPLICATE
            else:
                decided[digest] = Outcome.PUBLISHED if holder is None else Outcome.IN_FLIGHT
        to_send = [d for d in claimed if decided[d] is Outcome.PUBLISHED]
        try:
            self._send([self._job(events[newest[d]]) for d in to_send])
            if to_send:  # the source acts once this returns: replicas hold the jobs first
                wait_for_replicas(self._redis, self._wait_replicas, self._wait_timeout_ms)
        except BaseException:
            self._release(claimed, token)  # a retry must publish these: leave no claim behind
            raise
        self._commit(to_send, [d for d in claimed if d not in to_send], events, newest, token)
        return [
            decided[digest] if newest[digest] == index else Outcome.DUPLICATE
            for index, digest in enumerate(digests)
        ]

    def _commit(
        self,
        sent: list[str],
        unsent: list[str],
        events: Sequence[ObjectCreated],
        newest: dict[str, int],
        token: bytes,
    ) -> None:
        """Make each sent version its object's latest, and drop the claims of the others."""
        if not sent and not unsent:
            return
        pipe = self._redis.pipeline(transaction=False)
        for digest in sent:
            keys = [CLAIM_KEY.format(digest), LATEST_KEY.format(digest)]
            version = Version.of(events[newest[digest]]).to_json()
            self._commit_if_claimed(keys, [token, version, self._dedup_ttl_s], client=pipe)
        for digest in unsent:
            self._release_if_claimed([CLAIM_KEY.format(digest)], [token], client=pipe)
        pipe.execute()

    def _release(self, claimed: list[str], token: bytes) -> None:
        if claimed:
            pipe = self._redis.pipeline(transaction=False)
            for digest in claimed:
                self._release_if_claimed([CLAIM_KEY.format(digest)], [token], client=pipe)
            pipe.execute()

    def _job(self, event: ObjectCreated) -> Job:
        """The single-image job of one object: for this model, with its upload time."""
        return Job.new([event.ref()], model=self._identity, upload_time_s=event.upload_time_s)

    def record_bad(self, job_key: str, bad: Sequence[BadRecord]) -> None:
        """Keep unusable records in `bad_messages`."""
        record_bad_records(self.db, job_key, bad)
