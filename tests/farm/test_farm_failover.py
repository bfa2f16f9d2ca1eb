"""A Redis failover in a farm of hosts (tests/farm/hosts.py): on the services host a primary, a
replica and three Sentinels; two worker hosts and the producer host given only the
`sentinel://` broker URL. The primary is SIGKILLed mid-run; the workers and the producer follow
the new primary by themselves.

What asynchronous replication loses is made certain rather than left to chance: a second crawl
is published after the replica's link is cut (the primary acknowledges it, the replica never
gets it), while the worker hosts are frozen (so none of its jobs is taken before the kill). It
is found by `capworks enqueue --reconcile`: 0 images missing after it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from farm.hosts import REDIS_PASSWORD, REPLICA_PORT, RUN_LINE, Farm, running_farm
from farm.test_farm_hosts import Run, assert_whole, held_by, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.serial]
# Sized for CI (the farm's start included, about 3 minutes here): 96 images in jobs of 8, then
# a crawl of 32 that the failover loses; `bench/farm.py` sets CAPWORKS_FARM_IMAGES (1,000).
IMAGES = int(os.environ.get("CAPWORKS_FARM_IMAGES", "96"))
LOST_IMAGES, JOB_IMAGES = 32, 8


@pytest.fixture(scope="module")
def farm(shapes_dir: Path) -> Iterator[Farm]:
    """Two worker hosts, a producer host, and Redis behind Sentinels on the services host."""
    with running_farm(shapes_dir.parent.parent, workers=2, sentinels=True) as f:
        yield f


def replica_has_everything(farm: Farm) -> bool:
    primary = farm.redis().info("replication")
    replica = redis.Redis(farm.addr(1), REPLICA_PORT, password=REDIS_PASSWORD).info("replication")
    return int(replica["slave_repl_offset"]) >= int(primary["master_repl_offset"])


def settled(farm: Farm) -> bool:
    """The primary holds no job: none queued, none delivered and unacknowledged."""
    r = farm.redis()
    return int(r.llen("capworks")) == 0 and int(r.hlen("unacked")) == 0


def test_a_redis_failover_is_followed_and_reconcile_finds_what_it_lost(farm: Farm) -> None:
    supervisors = [host.pid1() for host in farm.worker_hosts()]
    run = Run(farm, "failover", images=IMAGES)
    lost = Run(farm, "failover-lost", images=LOST_IMAGES)
    run.enqueue(JOB_IMAGES)
    wait_for(lambda: run.counts()[0] >= 16, 300, "first captions")
    wait_for(lambda: replica_has_everything(farm), 10, "the replica to catch up")
    for host in farm.worker_hosts():
        farm.freeze(host)
    frozen_at = time.monotonic()
    # Read once the hosts are frozen: a job taken while the replica caught up is held too.
    run.held = [job for host in farm.worker_hosts() for job in held_by(farm, host)]
    marks = {host.ns: host.log.stat().st_size for host in farm.worker_hosts()}
    try:
        farm.cut_replication()
        lost.enqueue(JOB_IMAGES)  # acknowledged by the primary only
        farm.fail_over()
    finally:
        for host in farm.worker_hosts():
            farm.freeze(host, frozen=False)
    fault_at = run.fault_at = time.monotonic()  # `recovery_s`: to a held job's first commit
    wait_for(lambda: farm.primary_port() == REPLICA_PORT, 60, "the Sentinels to fail over")
    failover_s = time.monotonic() - fault_at
    drain_s = max(300.0, 1.5 * IMAGES)
    wait_for(
        lambda: run.note_recovery() or settled(farm), drain_s, "the new primary's queue to drain"
    )
    drained_s = time.monotonic() - fault_at
    missing = run.images + lost.images - run.counts()[0] - lost.counts()[0]
    # The producer host, with the same settings, finds what the failover lost.
    farm.enqueue(run.folder, JOB_IMAGES, "--reconcile")
    farm.enqueue(lost.folder, JOB_IMAGES, "--reconcile")
    lost.wait()
    run.wait()
    lost_counts = lost.counts()
    after = [
        host.log.read_bytes()[marks[host.ns] :].decode(errors="replace")
        for host in farm.worker_hosts()
    ]
    figures = run.report(
        "Redis failover (primary SIGKILLed; replica promoted by 3 Sentinels)",
        lost_crawl_captioned=lost_counts[0],
        missing_before_reconcile=missing,
        workers_frozen_s=round(fault_at - frozen_at, 1),
        failover_s=round(failover_s, 1),
        queue_drained_s=round(drained_s, 1),
        worker_hosts=2,
    )
    assert_whole(run, figures)
    assert lost_counts == (LOST_IMAGES, LOST_IMAGES, 0), figures
    # What the primary alone had acknowledged was lost, all of it, and nothing else.
    assert missing == LOST_IMAGES, figures
    # Frozen, then without Redis until the failover, the workers renewed no lease: jobs they
    # held then may have run again elsewhere, and no others.
    assert {job for job, _ in run.run_twice()} <= set(run.held), figures
    # Both worker hosts consumed from the new primary, their supervisors never restarted.
    assert all(RUN_LINE.search(text) for text in after), "a host took no job after the failover"
    assert [host.pid1() for host in farm.worker_hosts()] == supervisors, "a supervisor died"
