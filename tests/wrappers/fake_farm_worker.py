"""A real Celery worker that counts every image it fetches (one fetch per run of a job's image,
so a job that runs twice is seen twice), for the farm-fault tests. Images under a "slow/" prefix
take CAPWORKS_TEST_SLOW_S to fetch, so that jobs are mid-run when the fault lands. With
CAPWORKS_TEST_HANG=1 its captioner answers the start-up probe and then hangs for ever on its
first batch of job images (a stand-in for a GPU that stops answering, which cannot be made on
purpose here); with CAPWORKS_TEST_HANG_MARK=FILE as well, the hang is the device's, not the
process's: the first hang creates FILE, and a process started while FILE exists hangs at once,
in its probe, as on a GPU that stays hung across restarts. With CAPWORKS_TEST_CLOCK_SKEW_S=S its
wall clock (`time.time`) reads S seconds off, an injected clock for a host whose clock is wrong
(tests/farm skews whole hosts with libfaketime instead: Farm.skew_clock). With
CAPWORKS_TEST_DELAY_START_S=S each job waits S seconds after it is received, before its task
body runs (Celery's task_prerun), so a job can be held received but not started. Everything
else is the production worker, plugged in through the runtime's seams; run it as
`fake_farm_worker.py worker ...` or supervised by `supervised_farm_worker.py`."""
# ruff: noqa: E402 - the clock is set before the worker's modules are imported

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence

SKEW_S = float(os.environ.get("CAPWORKS_TEST_CLOCK_SKEW_S", "0"))
if SKEW_S:  # before anything else imports time.time
    _host_time = time.time
    time.time = lambda: _host_time() + SKEW_S  # type: ignore[assignment]

from celery.signals import task_prerun

from capworks.schema.checkpoint import resolve_checkpoint
from capworks.schema.instance import instance_id
from capworks.schema.queue import make_redis
from capworks.schema.settings import Settings
from capworks.schema.storage import make_s3_client
from capworks.schema.uris import ImageRef
from capworks.workers import runtime
from capworks.workers.batcher import Captioner, ModelPixels
from capworks.workers.engine import Caption
from capworks.workers.fetch import Fetched, StoreFetcher
from capworks.workers.tasks import app

RUNS_KEY = os.environ.get("CAPWORKS_TEST_RUNS_KEY", "capworks:test:runs")
SLOW_S = float(os.environ.get("CAPWORKS_TEST_SLOW_S", "2"))
HANG = os.environ.get("CAPWORKS_TEST_HANG") == "1"
HANG_MARK = os.environ.get("CAPWORKS_TEST_HANG_MARK", "")
DELAY_START_S = float(os.environ.get("CAPWORKS_TEST_DELAY_START_S", "0"))


class FakeCountingFetcher:
    """The production fetcher; each fetch is recorded as `<instance> <uri>` in a Redis list."""

    def __init__(self, real: StoreFetcher, settings: Settings) -> None:
        self._real = real
        self._redis = make_redis(settings, socket_timeout_s=5)

    def fetch(self, ref: ImageRef) -> bytes | Fetched:
        self._record(ref.uri)
        if "/slow/" in ref.uri:
            time.sleep(SLOW_S)
        return self._real.fetch(ref)

    def _record(self, uri: str) -> None:
        for _ in range(120):  # Redis may be restarting: the count must not be lost
            try:
                self._redis.rpush(RUNS_KEY, f"{instance_id()} {uri}")
                return
            except Exception:  # noqa: BLE001 - retried; a test double
                time.sleep(0.5)


class FakeHangingCaptioner:
    """The real captioner for the start-up probe; then every batch hangs for ever, like a GPU
    that stopped answering (at once, probe included, while the device's hang mark exists)."""

    device = "cpu"

    def __init__(self, real: Captioner) -> None:
        self._real = real
        self._batches = 0

    def caption_pixels(self, pixels: Sequence[ModelPixels]) -> list[Caption]:
        self._batches += 1
        device_hung = bool(HANG_MARK) and os.path.exists(HANG_MARK)
        if self._batches == 1 and not device_hung:
            return self._real.caption_pixels(pixels)
        if HANG_MARK:
            open(HANG_MARK, "a").close()
        threading.Event().wait()
        raise AssertionError("unreachable")


def build(settings: Settings) -> runtime.Runtime:
    real = StoreFetcher.from_settings(settings, make_s3_client(settings))
    captioner = None
    if HANG:
        config = resolve_checkpoint(settings.model, settings.revision, settings.checkpoint_dir)
        load = runtime.load_engine(config, settings)
        captioner = lambda: FakeHangingCaptioner(load())  # noqa: E731 - the model thread loads it
    return runtime.Runtime.build(
        settings, fetcher=FakeCountingFetcher(real, settings), captioner=captioner
    )


runtime.configure(build)

if DELAY_START_S:

    @task_prerun.connect
    def _delay_start(**_: object) -> None:
        time.sleep(DELAY_START_S)


if __name__ == "__main__":
    app.worker_main(argv=sys.argv[1:])
