"""A real Celery worker whose fetch step kills the process on any image whose URI ends in
"kills-worker.png": a stand-in for an image that crashes a worker (a native decoder bug, an
OOM kill), which cannot be produced on purpose here. Images under a "slow/" prefix take 2 s to
fetch, so that innocent jobs are mid-run when the process dies. Everything else is the
production worker."""

from __future__ import annotations

import os
import sys
import time

import workers.job
from workers.tasks import app

real_fetch_many = workers.job.fetch_many


def fake_fetch_many(refs, fetcher, pool):  # type: ignore[no-untyped-def]
    if any(ref.uri.endswith("kills-worker.png") for ref in refs):
        time.sleep(0.5)  # let the jobs held beside it start
        os._exit(137)  # like the kernel's OOM killer: no cleanup, no acknowledgement
    if any("/slow/" in ref.uri for ref in refs):
        time.sleep(2.0)
    return real_fetch_many(refs, fetcher, pool)


workers.job.fetch_many = fake_fetch_many

if __name__ == "__main__":
    app.worker_main(argv=sys.argv[1:])
