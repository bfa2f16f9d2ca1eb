"""The Redis ledger of job runs: how many runs of a job started and never finished (its process
died each time: the poison count), which jobs are committed (a redelivered copy is dropped), and
how often a message was handed back because its outcome could not be recorded (bounded: then it
is set aside in `capworks:gave-up`)."""

from __future__ import annotations

import json
from typing import Any

from capworks.schema.redact import redact

RUNS_KEY = "capworks:runs:{}"
DONE_KEY = "capworks:done:{}"
REQUEUES_KEY = "capworks:requeues:{}"
# Messages handed back too often because their outcome could not be recorded, newest first.
GAVE_UP_KEY = "capworks:gave-up"
GAVE_UP_KEPT = 10_000
KEY_TTL_S = 7 * 24 * 3600


class RunLedger:
    """Run counts and done marks of jobs, kept in Redis for a week."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def unfinished_runs(self, job_id: str) -> int:
        """How many runs of this job started and never finished: its process died each time."""
        return int(self.redis.get(RUNS_KEY.format(job_id)) or 0)

    def count_run(self, job_id: str) -> None:
        """Record that a run of this job starts (cleared by `mark_done` when it finishes)."""
        key = RUNS_KEY.format(job_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, KEY_TTL_S)
        pipe.execute()

    def is_done(self, job_id: str) -> bool:
        """True when a job with this id has already been fully committed."""
        return bool(self.redis.exists(DONE_KEY.format(job_id)))

    def mark_done(self, job_id: str) -> None:
        """Remember that a job is committed, so a redelivered copy is dropped."""
        self.redis.set(DONE_KEY.format(job_id), 1, ex=KEY_TTL_S)
        self.redis.delete(RUNS_KEY.format(job_id))

    def count_requeue(self, message_id: str) -> int:
        """Count one more hand-back of a message whose outcome could not be recorded; the total."""
        key = REQUEUES_KEY.format(message_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, KEY_TTL_S)
        return int(pipe.execute()[0])

    def give_up(self, message_id: str, entry: dict[str, Any]) -> None:
        """Set a message aside (newest first, the last `GAVE_UP_KEPT` kept) for an operator."""
        pipe = self.redis.pipeline()
        pipe.lpush(GAVE_UP_KEY, redact(json.dumps(entry, default=repr)))
        pipe.ltrim(GAVE_UP_KEY, 0, GAVE_UP_KEPT - 1)
        pipe.delete(REQUEUES_KEY.format(message_id))
        pipe.execute()
