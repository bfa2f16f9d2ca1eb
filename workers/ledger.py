"""The Redis ledger of job runs: how many runs of a job started and never finished (its process
died each time: the poison count), and which jobs are committed (a redelivered copy is dropped)."""

from __future__ import annotations

from typing import Any

RUNS_KEY = "capworks:runs:{}"
DONE_KEY = "capworks:done:{}"
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
