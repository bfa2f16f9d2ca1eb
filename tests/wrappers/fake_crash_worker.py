"""A real Celery worker whose fetcher kills the process on any image whose URI ends in
"kills-worker.png": a stand-in for an image that crashes a worker (a native decoder bug, an
OOM kill), which cannot be produced on purpose here. Images under a "slow/" prefix take 2 s
(or CAPWORKS_TEST_SLOW_S) to fetch, so that innocent jobs are mid-run when the process dies.
It plugs in through the runtime's fetcher seam; everything else is the production worker."""

from __future__ import annotations

import os
import sys
import time

from capworks.schema.settings import Settings
from capworks.schema.storage import make_s3_client
from capworks.schema.uris import ImageRef
from capworks.workers import runtime
from capworks.workers.fetch import Fetched, StoreFetcher
from capworks.workers.tasks import app

SLOW_S = float(os.environ.get("CAPWORKS_TEST_SLOW_S", "2"))


class FakeCrashingFetcher:
    """The production fetcher, except for the crashing and slow images described above."""

    def __init__(self, real: StoreFetcher) -> None:
        self._real = real

    def fetch(self, ref: ImageRef) -> bytes | Fetched:
        if ref.uri.endswith("kills-worker.png"):
            time.sleep(0.5)  # let the jobs held beside it start
            os._exit(137)  # like the kernel's OOM killer: no cleanup, no acknowledgement
        if "/slow/" in ref.uri:
            time.sleep(SLOW_S)
        return self._real.fetch(ref)


def build(settings: Settings) -> runtime.Runtime:
    real = StoreFetcher.from_settings(settings, make_s3_client(settings))
    return runtime.Runtime.build(settings, fetcher=FakeCrashingFetcher(real))


runtime.configure(build)

if __name__ == "__main__":
    app.worker_main(argv=sys.argv[1:])
