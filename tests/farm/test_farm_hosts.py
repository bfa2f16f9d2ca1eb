"""The faults farms meet, injected into a farm of hosts in namespaces (tests/farm/hosts.py): three
worker hosts with one hostname, each the real `capworks worker --gpus cpu` as PID 1, a services
host (Redis, PostgreSQL), a producer host running `capworks enqueue`. Each test counts images
lost, caption rows per image, jobs run more than once (from the "job J: attempt A starts" lines
the worker hosts log: a job that runs on two hosts shows twice), time to recover, and its wall
time against the calm run.

Sizes: CAPWORKS_FARM_IMAGES (160 here, 1,000 through `bench/farm.py`), jobs of
CAPWORKS_FARM_JOB_IMAGES (16; the deploy test's jobs about 3 leases long here), faults
CAPWORKS_FARM_REDIS_PARTITION_S (20) and CAPWORKS_FARM_PG_PARTITION_S (60) long. With
CAPWORKS_FARM_OUT each test appends its figures there as a JSON line."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, png_bytes, require_service
from faults.harness import jobs_held
from pipeline_support import instance_of
from sqlalchemy import create_engine, func, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Failure, Image
from capworks.workers.leases import OWNERS_KEY, lease_key, renew_every_s
from capworks.workers.ledger import DONE_KEY
from farm.hosts import (
    PG_PORT,
    REDIS_PORT,
    Farm,
    Host,
    in_ns,
    running_farm,
    sh,
    skew_missing,
)

pytestmark = [pytest.mark.slow, pytest.mark.serial]
SUPERVISED = REPO / "tests" / "wrappers" / "supervised_farm_worker.py"
IMAGES = int(os.environ.get("CAPWORKS_FARM_IMAGES", "160"))
JOB_IMAGES = int(os.environ.get("CAPWORKS_FARM_JOB_IMAGES", "16"))
REDIS_PARTITION_S = float(os.environ.get("CAPWORKS_FARM_REDIS_PARTITION_S", "20"))
PG_PARTITION_S = float(os.environ.get("CAPWORKS_FARM_PG_PARTITION_S", "60"))
OUT = os.environ.get("CAPWORKS_FARM_OUT")
# A crawl's time limit: 1,000 images at this machine's slowest (1.8 images/s) take ~9 min.
WAIT_S = max(600.0, 1.5 * IMAGES)
LEASE_S = Settings.model_fields["lease_s"].default
TICK_S = renew_every_s(LEASE_S)
# CI's machine is shared: a recovery may wait this much longer than the promise for a CPU.
MARGIN_S = 10.0
# A host cut off from Redis polls again within this of the heal: its broker commands time out
# and kombu drops a fetch with no reply (schema/queue.py: 10 s, 21 s) during the partition, so
# after the heal it only opens a new connection (without the timeouts it waited on TCP's
# backed-off retransmissions: 95 s after a 120 s partition).
POLLS_AGAIN_WITHIN_S = LEASE_S + MARGIN_S


@pytest.fixture(scope="module")
def farm(shapes_dir: Path) -> Iterator[Farm]:
    """Three worker hosts, a services host and a producer host, for every test of the module."""
    with running_farm(shapes_dir.parent.parent, workers=3) as f:
        yield f


class Run:
    """One crawl of a fresh folder of images through the farm, and what it counts."""

    calm_s: float | None = None  # the calm run's wall time, for the others' ratio

    def __init__(self, farm: Farm, name: str, images: int = IMAGES) -> None:
        self.farm, self.name, self.images = farm, name, images
        self.folder = farm.images / name
        self.folder.mkdir(parents=True)
        for i, (img, _) in enumerate(sample_scenes(images, seed=len(name) * 7919 + images)):
            (self.folder / f"{i:05d}.png").write_bytes(png_bytes(img))
        self.runs_before = farm.runs()
        self.started = 0.0
        self.wall_s = 0.0
        self.held: list[str] = []
        self.fault_at = 0.0
        self.recovered_s: list[float] = []  # to the first commit of a job held at the fault
        self.tags: dict[str, set[str]] = {}  # delivery tags held at the fault, by instance
        self.back_s: float | None = None  # to the first of them handed to another process

    def enqueue(self, job_images: int = JOB_IMAGES) -> None:
        self.started = time.monotonic()
        self.farm.enqueue(self.folder, job_images)

    def counts(self) -> tuple[int, int, int]:
        """(images captioned, caption rows, dead letters) of this run's folder."""
        like = Image.uri.like(f"%/{self.name}/%")
        engine = create_engine(self.farm.db_url)
        try:
            with engine.connect() as conn:
                captioned = conn.scalar(
                    select(func.count(func.distinct(Caption.image_id))).join(Image).where(like)
                )
                rows = conn.scalar(
                    select(func.count()).select_from(Caption).join(Image).where(like)
                )
                dead = conn.scalar(
                    select(func.count()).select_from(Failure).join(Image).where(like)
                )
        finally:
            engine.dispose()
        return int(captioned or 0), int(rows or 0), int(dead or 0)

    def finished(self) -> bool:
        captioned, _, dead = self.counts()
        return captioned + dead >= self.images

    def note_fault(self, host: Host, jobs: list[str]) -> None:
        """The fault lands on `host` now; it holds `jobs`."""
        r = self.farm.redis()
        self.tags = {instance_of(pid): set(tags_of(r, pid)) for pid in host.workers()}
        self.fault_at, self.held = time.monotonic(), jobs

    def note_recovery(self) -> None:
        """Record when a message held at the fault was first released to another process
        (restored to the queue, or owned elsewhere: the lease's promise), and when a job held
        at the fault was first committed (that, plus waiting for a slot and running it)."""
        r = self.farm.redis()
        now = time.monotonic() - self.fault_at
        if self.back_s is None and self.tags:
            owners = {t: r.hget(OWNERS_KEY, t) for tags in self.tags.values() for t in tags}
            for tag, owner in owners.items():
                if not r.hexists("unacked", tag) or (owner and owner.decode() not in self.tags):
                    self.back_s = now
                    break
        if self.held and not self.recovered_s:
            if any(r.exists(DONE_KEY.format(j)) for j in self.held):
                self.recovered_s.append(now)

    def wait(self, timeout_s: float = WAIT_S, during: Callable[[], None] = lambda: None) -> None:
        """Until every image is captioned or dead-lettered, noting recoveries."""
        deadline = time.monotonic() + timeout_s
        while not self.finished():
            assert time.monotonic() < deadline, f"{self.name}: not done after {timeout_s} s"
            self.note_recovery()
            during()
            time.sleep(0.5)
        self.note_recovery()
        self.wall_s = time.monotonic() - self.started

    def run_twice(self) -> dict[tuple[str, int], int]:
        """The (job, attempt) pairs started more than once, summed over every host."""
        new = self.farm.runs() - self.runs_before
        return {key: n for key, n in new.items() if n > 1}

    def report(self, fault: str, **extra: object) -> dict[str, object]:
        captioned, rows, dead = self.counts()
        figures = {
            "fault": fault,
            "images": self.images,
            "lost": self.images - captioned - dead,
            "rows_per_image": round(rows / max(captioned, 1), 3),
            "dead_letters": dead,
            "jobs_run_twice": len(self.run_twice()),
            "held_at_fault": len(self.held),
            "back_in_queue_s": None if self.back_s is None else round(self.back_s, 1),
            "recovery_s": [round(s, 1) for s in self.recovered_s],
            "wall_s": round(self.wall_s, 1),
            "wall_vs_calm": round(self.wall_s / Run.calm_s, 2) if Run.calm_s else None,
            **extra,
        }
        print(f"\nfarm: {json.dumps(figures)}")
        if OUT:
            with open(OUT, "a") as out:
                out.write(json.dumps(figures) + "\n")
        return figures


def tags_of(r: Any, pid: int) -> list[str]:
    """The delivery tags a worker process leases."""
    return [t.decode() for t in r.smembers(lease_key(instance_of(pid)))]


def held_by(farm: Farm, host: Host) -> list[str]:
    """The job ids the worker processes of `host` hold (their leases, read in Redis)."""
    r = farm.redis()
    return [job for pid in host.workers() for job in jobs_held(r, pid)]


def busy(run: Run, host: Host, timeout_s: float = 120, require_caption: bool = True) -> list[str]:
    """Until `host` holds jobs and a first image of the run is captioned: mid-run."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = held_by(run.farm, host)
        if jobs and (run.counts()[0] > 0 or not require_caption):
            return jobs
        assert time.monotonic() < deadline, f"{host.ns} took no job of {run.name}"
        time.sleep(0.2)


def assert_whole(run: Run, figures: dict[str, object]) -> None:
    """Nothing lost, nothing dead-lettered, one caption row per image."""
    assert figures["lost"] == 0, figures
    assert figures["dead_letters"] == 0, figures
    assert figures["rows_per_image"] == 1.0, figures


def test_a_calm_farm_captions_every_image_once(farm: Farm) -> None:
    run = Run(farm, "calm")
    run.enqueue()
    run.wait()
    Run.calm_s = run.wall_s
    figures = run.report("none (calm)")
    assert_whole(run, figures)
    assert run.run_twice() == {}
    assert all(host.runs() for host in farm.worker_hosts()), "a host took no job"


def test_a_lost_host_loses_nothing_and_its_jobs_come_back_after_the_lease(farm: Farm) -> None:
    victim = farm.worker_hosts()[0]
    run = Run(farm, "hostloss")
    run.enqueue()
    run.note_fault(victim, busy(run, victim))
    pids = victim.workers()
    farm.kill_host(victim)  # every process of the host at once: no hand-back, no ack
    # What it held when it died, read from its leases (they outlive it by the lease): between
    # the look above and the kill it may have taken another job (at 1,000 images it did).
    r = farm.redis()
    run.held = sorted(set(run.held) | {job for pid in pids for job in jobs_held(r, pid)})
    run.wait()
    farm.start_worker(victim)
    farm.wait_ready(victim)
    figures = run.report("host loss (SIGKILL of its PID 1)")
    assert_whole(run, figures)
    # Only the dead host's jobs may have run twice: it truly died holding them.
    assert {job for job, _ in run.run_twice()} <= set(run.held), figures
    assert run.recovered_s, "no job the lost host held was committed"
    # Promise: back in the queue within the lease and one reaper tick (then it waits for a
    # free slot elsewhere and runs: `recovery_s`, recorded).
    assert run.back_s is not None and run.back_s <= LEASE_S + TICK_S + MARGIN_S, figures


def cut_off(run: Run, host: Host, port: int, seconds: float) -> None:
    """`host` cut off from `port` on the services host for `seconds` (recoveries noted
    meanwhile), then healed, also when the wait fails."""
    run.farm.partition(host, port)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            run.note_recovery()
            time.sleep(0.5)
    finally:
        run.farm.heal(host)


def test_a_host_cut_off_from_redis_loses_nothing_and_consumes_again_after(farm: Farm) -> None:
    victim = farm.worker_hosts()[1]
    supervisor = victim.pid1()
    run = Run(farm, "redispart")
    run.enqueue()
    run.note_fault(victim, busy(run, victim))
    log_at = len(victim.log.read_text(errors="replace"))
    cut_off(run, victim, REDIS_PORT, REDIS_PARTITION_S)
    healed_at = time.monotonic()
    # What TCP still owes across the healed link, each side: a retransmission backing off.
    svc = farm.services
    assert svc is not None
    timers = {"redis": tcp_timers(svc, victim), "victim": tcp_timers(victim, svc)}
    polls_again_s: list[float] = []  # from the heal to its consumer's first blocking fetch

    def watch() -> None:
        if not polls_again_s and polling(farm, victim):
            polls_again_s.append(round(time.monotonic() - healed_at, 1))

    run.wait(during=watch)
    figures = run.report(f"partition from Redis {REDIS_PARTITION_S:.0f} s", tcp_at_heal=timers)
    assert_whole(run, figures)
    # It lost Redis for longer than the lease: only its own jobs may have run again.
    assert {job for job, _ in run.run_twice()} <= set(run.held), figures
    assert run.back_s is not None and run.back_s <= LEASE_S + TICK_S + MARGIN_S, figures
    assert victim.pid1() == supervisor, "the cut-off host's supervisor died"
    # It consumes again: its consumer polls Redis again soon after the heal, and a second
    # crawl, enough jobs for every host's prefetch, reaches it.
    wait_for(lambda: polling(farm, victim), 120, f"{victim.ns}'s consumer to poll Redis again")
    watch()
    assert polls_again_s[0] <= POLLS_AGAIN_WITHIN_S, (
        f"{victim.ns} polled Redis again {polls_again_s[0]} s after the heal "
        f"(promise: {POLLS_AGAIN_WITHIN_S:.0f} s)"
    )
    # kombu's own check of a blocking fetch that got no reply: how long it had waited.
    since_cut = victim.log.read_text(errors="replace")[log_at:]
    stale = re.findall(r"BRPOP got no reply for (\d+) seconds", since_cut)
    # Celery's waits between its attempts to reconnect, as its consumer logs them.
    reconnect_waits = re.findall(r"Trying again in (\d+\.\d+) seconds", since_cut)
    before = victim.runs()
    again = Run(farm, "redispart-after", images=4 * 16)
    again.enqueue(job_images=4)
    again.wait()
    assert victim.runs() - before, f"{victim.ns} took no job after the partition healed"
    assert_whole(
        again,
        again.report(
            "after the Redis partition healed",
            polls_again_s=polls_again_s[0],
            stale_fetch_dropped_after_s=[int(s) for s in stale],
            reconnect_waits_s=[float(s) for s in reconnect_waits],
        ),
    )


def polling(farm: Farm, host: Host) -> bool:
    """Whether a consumer on `host` has just issued a blocking fetch (Redis's CLIENT LIST)."""
    return any(
        str(c.get("addr", "")).rsplit(":", 1)[0] == host.addr
        and c.get("cmd") in ("blmove", "brpop")
        and int(c.get("idle", 99)) <= 2
        for c in farm.redis().client_list()
    )


def tcp_timers(host: Host, peer: Host) -> list[str]:
    """`host`'s TCP timers on its connections to `peer` as `ss -o` shows them: a retransmission
    backing off reads `timer:(on,<due in>,<retries so far>)`."""
    out = sh(*in_ns(host.ns, "ss", "-tno", "dst", peer.addr))
    return re.findall(r"timer:\(on,[^)]*\)", out)


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < end, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


def test_a_rolling_deploy_runs_no_job_twice_and_loses_nothing(farm: Farm) -> None:
    run = Run(farm, "deploy")
    run.enqueue()  # 10 jobs of 16: each about 3 leases long on this machine's shared CPU
    exits, busy_at_stop = [], []
    for host in farm.worker_hosts():
        try:  # a deploy stops every host, busy or not: wait a while for it to hold a job
            busy_at_stop.append(len(busy(run, host, timeout_s=30, require_caption=False)))
        except AssertionError:
            busy_at_stop.append(0)
        exits.append(farm.stop_host(host))  # warm shutdown: running jobs finish, the rest go back
        farm.start_worker(host)
        farm.wait_ready(host)
    run.wait()
    figures = run.report(
        "rolling deploy (SIGTERM each host in turn)", exits=exits, held_at_stop=busy_at_stop
    )
    assert_whole(run, figures)
    assert any(busy_at_stop), "no host held a job when it was stopped"
    assert run.run_twice() == {}, figures
    assert exits == [0, 0, 0], figures


def test_a_host_cut_off_from_postgresql_waits_and_acknowledges_nothing_unwritten(
    farm: Farm,
) -> None:
    victim = farm.worker_hosts()[2]
    supervisor = victim.pid1()
    run = Run(farm, "pgpart")
    run.enqueue()
    run.note_fault(victim, busy(run, victim))
    cut_off(run, victim, PG_PORT, PG_PARTITION_S)
    run.wait()
    figures = run.report(f"partition from PostgreSQL {PG_PARTITION_S:.0f} s")
    assert_whole(run, figures)  # a job acknowledged before its write would show as lost
    # The host kept Redis and its leases: nothing it held may run elsewhere.
    assert run.run_twice() == {}, figures
    assert victim.pid1() == supervisor, "the host's supervisor died"


def test_a_hung_model_threads_jobs_are_captioned_on_other_hosts(farm: Farm) -> None:
    victim = farm.worker_hosts()[0]
    stale_s = 10.0
    farm.stop_host(victim)
    # The real supervisor over a worker whose captioner stops answering after its start-up
    # probe (FakeHangingCaptioner, through the runtime's Captioner seam): a GPU that stopped
    # answering cannot be made here. The hang stays with the host's device (its mark file), so
    # the processes the supervisor starts after the stall hang in their probe, holding nothing.
    hanging = [sys.executable, str(SUPERVISED)]
    farm.start_worker(
        victim,
        command=hanging,
        CAPWORKS_TEST_HANG="1",
        CAPWORKS_TEST_HANG_MARK=str(farm.root / f"{victim.ns}-device-hung"),
        CAPWORKS_HEARTBEAT_STALE_S=str(stale_s),
    )
    farm.wait_ready(victim)
    before = victim.runs()
    run = Run(farm, "hung")
    run.enqueue()
    run.note_fault(victim, busy(run, victim, require_caption=False))
    try:
        run.wait()
    finally:
        farm.kill_host(victim)  # a warm shutdown would wait for the hung batch for ever
        farm.start_worker(victim)
        farm.wait_ready(victim)
    figures = run.report(f"hung model thread (heartbeat stale after {stale_s:.0f} s)")
    assert_whole(run, figures)
    # Only jobs the hung host started may have run again (its process exited, stalled), and
    # only its first process started any: a process restarted on the hung device stalls in its
    # start-up probe. Without the probe each restart took `prefetch_jobs` more jobs and hung on
    # them (1,000 images, 2026-12-06: 16 jobs run twice, 4 held at the fault).
    started_there = {job for job, _ in victim.runs() - before}
    assert {job for job, _ in run.run_twice()} <= started_there, figures
    assert len(started_there) <= Settings().prefetch_jobs, (started_there, figures)
    assert run.back_s is not None and run.back_s <= stale_s + 15 + MARGIN_S, figures


def test_hosts_30_s_ahead_and_behind_lose_nothing_and_rerun_only_a_dead_hosts_jobs(
    farm: Farm,
) -> None:
    """One worker host's wall clock 30 s ahead and another's 30 s behind (libfaketime, under
    their real supervisors and workers), the third true; the ahead host dies holding jobs.
    Leases, reaps and heartbeats read Redis's clock, so the skew changes nothing: its jobs are
    back within the lease and a tick, and no job the behind host ran is taken from it."""
    missing = skew_missing()
    if missing:
        require_service("libfaketime", missing)
    ahead, behind, _ = farm.worker_hosts()
    skews = [(ahead, 30), (behind, -30)]
    clocks = {}  # what `date` and Python read inside each skewed host, minus the true time
    try:
        for host, offset_s in skews:
            farm.skew_clock(host, offset_s)
        for host, offset_s in skews:
            farm.wait_ready(host)
            date_s, python_s = farm.clock_offset_s(host)
            clocks[host.ns] = [round(date_s, 1), round(python_s, 1)]
            # Inside the host, in its worker's own environment: the skew really is applied.
            assert abs(date_s - offset_s) < 5 and abs(python_s - offset_s) < 5, clocks
        supervisor = behind.pid1()
        run = Run(farm, "skew")
        run.enqueue()
        busy(run, behind, require_caption=False)  # both skewed hosts renew leases meanwhile
        run.note_fault(ahead, busy(run, ahead))
        farm.kill_host(ahead)
        run.wait()
        assert behind.pid1() == supervisor, "the behind host's supervisor died"
    finally:
        for host, _ in skews:
            farm.skew_clock(host, 0)
        for host, _ in skews:
            farm.wait_ready(host)
    figures = run.report(
        "clock skew: a host +30 s (killed holding jobs), another -30 s", clocks_off_s=clocks
    )
    assert_whole(run, figures)
    # Only the dead host's jobs may have run twice: the behind host's leases held.
    assert {job for job, _ in run.run_twice()} <= set(run.held), figures
    assert run.recovered_s, "no job the dead host held was committed"
    assert run.back_s is not None and run.back_s <= LEASE_S + TICK_S + MARGIN_S, figures


def test_runs_are_counted_per_host_from_the_workers_own_log(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text(
        "[INFO] job abc-1: attempt 1 starts, 16 images\n"
        "[INFO] job abc-1 was already committed; dropping the redelivered copy\n"
        "[INFO] job abc-2:r1: attempt 2 starts, 3 images\n"
        "[INFO] job abc-1: attempt 1 starts, 16 images\n"
    )
    assert Host("ns", "198.18.0.9", log).runs() == Counter({("abc-1", 1): 2, ("abc-2:r1", 2): 1})
