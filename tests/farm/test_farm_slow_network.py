"""A slow network in the farm of hosts (issue 27, 2.7). This kernel has no `sch_netem`, so the
delay is a delay proxy on the services host (tests/farm/delay_proxy.py): every worker host and
the producer host reach Redis, PostgreSQL and the image store (an HTTP server of the images,
fetched by URL through the fetch guard) through it, and while it holds, every chunk waits 25 ms
each way (50 ms a round trip). With it, every worker host and the producer host drop 1% of their
packets both ways (`slow_network`: netem where the kernel has it, else iptables' `statistic`).

The clean and the slow runs go through the same proxy, holding or not, and alternate (clean,
slow, slow, clean), so the proxy's own CPU and the machine's load drifting over the test weigh
on both alike. Worker images/s with the slow network over images/s without it: goal >= 0.9 with
the default prefetch (4); asserted with a margin for a shared machine's noise (MARGIN).

Worker images/s is a run's images over the workers' window: from the moment its first job is in
Redis (the queue or a worker's unacked hash, watched by the test every 5 ms) to the last
caption's `created` (set by the worker as it makes the caption; the clocks are one, no host is
skewed here). The enqueue command's own time (its PostgreSQL statements and Redis writes
through the proxy, about 9 s more when slow at this size) is reported beside it, as is the
run's whole wall time, but it is the producer's, not the workers': with 40 images a run, every
job is published in the enqueue's last second, so the wall time mostly measures the producer.

Sizes: each of the four runs is CAPWORKS_FARM_SLOW_IMAGES images (40; `bench/farm.py` sets it
to a quarter of its --images), in jobs of CAPWORKS_FARM_JOB_IMAGES (16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select

from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Image
from farm.hosts import CAPWORKS, PG_PORT, REDIS_PORT, Farm, Host, in_ns, running_farm
from farm.test_farm_hosts import JOB_IMAGES, OUT, Run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.quiet]
IMAGES = int(os.environ.get("CAPWORKS_FARM_SLOW_IMAGES", "40"))
# Each way: a round trip through the proxy takes 50 ms more (CAPWORKS_FARM_DELAY_MS).
DELAY_MS = float(os.environ.get("CAPWORKS_FARM_DELAY_MS", "25"))
LOSS_PCT = 1.0
HTTP_PORT = 8080
PROXY_PORTS = {REDIS_PORT: 16379, PG_PORT: 15432, HTTP_PORT: 18080}  # target -> proxy
GOAL = 0.9
# Four runs of 40 images on a 2-core machine shared with other jobs: a run's wall time moved by
# up to ~25% with nothing changed (see RELIABILITY.md); below this the test fails.
MARGIN = 0.25
PROXY = Path(__file__).with_name("delay_proxy.py")


class SlowFarm:
    """The farm and its delay proxy, which holds chunks after `slow()` until `clean()`."""

    def __init__(self, farm: Farm, proxy: subprocess.Popen[bytes]) -> None:
        self.farm, self.proxy = farm, proxy

    def hosts(self) -> list[Host]:
        assert self.farm.producer is not None
        return [*self.farm.worker_hosts(), self.farm.producer]

    def ping_s(self) -> float:
        """One Redis round trip through the proxy, as the worker hosts make it."""
        via = redis.Redis.from_url(self.farm.redis_url(PROXY_PORTS[REDIS_PORT]), socket_timeout=10)
        try:
            via.ping()  # connected (the handshake is not delayed: the proxy accepts it)
            started = time.monotonic()
            via.ping()
            return time.monotonic() - started
        finally:
            via.close()

    def slow(self) -> str:
        """Hold every chunk through the proxy; lose packets on every worker and producer host."""
        self.proxy.send_signal(signal.SIGUSR1)
        wait_for(lambda: self.ping_s() >= 2 * DELAY_MS / 1000, 10, "the proxy to hold chunks")
        applied = {self.farm.slow_network(host, 0, LOSS_PCT) for host in self.hosts()}
        loss = "netem" if any(a.startswith("netem") for a in applied) else "iptables statistic"
        return f"delay proxy {DELAY_MS:g} ms each way, {LOSS_PCT:g}% packet loss ({loss})"

    def clean(self) -> None:
        for host in self.hosts():
            self.farm.heal(host)
        self.proxy.send_signal(signal.SIGUSR2)
        wait_for(lambda: self.ping_s() < DELAY_MS / 1000, 10, "the proxy to pass chunks")


@pytest.fixture(scope="module")
def slow_farm(shapes_dir: Path) -> Iterator[SlowFarm]:
    """Three worker hosts that reach every service through the delay proxy (passing chunks at
    once until told to hold them), and an HTTP server of the images on the services host."""
    with running_farm(shapes_dir.parent.parent, workers=0) as farm:
        svc = farm.services
        assert svc is not None
        serve = ["-m", "http.server", str(HTTP_PORT), "--bind", svc.addr]
        run_on(farm, svc, [sys.executable, *serve, "--directory", str(farm.images)])
        pairs = [f"{port}:{target}" for target, port in PROXY_PORTS.items()]
        proxy = run_on(farm, svc, [sys.executable, str(PROXY), "--delay-ms", str(DELAY_MS),
                                   svc.addr, *pairs])  # fmt: skip
        wait_for(lambda: "delay proxy: listening" in svc.log.read_text(), 30, "the proxy")
        via = farm.addr(1)
        farm.worker_env.update(
            CAPWORKS_BROKER_URL=farm.broker_url.replace(
                f"{via}:{REDIS_PORT}", f"{via}:{PROXY_PORTS[REDIS_PORT]}"
            ),
            CAPWORKS_DATABASE_URL=farm.db_url.replace(
                f"{via}:{PG_PORT}", f"{via}:{PROXY_PORTS[PG_PORT]}"
            ),
            CAPWORKS_FETCH_ALLOW_CIDRS=f"{via}/32",
        )
        for i in range(3):
            farm.start_worker(farm.start_host(f"w{i + 1}", 11 + i))
        for host in farm.worker_hosts():
            farm.wait_ready(host)
        # Every worker host reaches Redis through the proxy: none is its client directly.
        direct = {c["addr"].rsplit(":", 1)[0] for c in farm.redis().client_list()}
        assert not direct & {host.addr for host in farm.worker_hosts()}, direct
        slow = SlowFarm(farm, proxy)
        try:
            yield slow
        finally:
            slow.clean()


def run_on(farm: Farm, host: Host, cmd: list[str]) -> subprocess.Popen[bytes]:
    """A process on `host`, logging to its log; stopped with the farm."""
    out = host.log.open("ab")
    proc = subprocess.Popen(in_ns(host.ns, *cmd), stdout=out, stderr=out)
    host.procs.append(proc)
    return proc


class FirstJob:
    """Watches Redis directly (not through the proxy) from `start()` until a job is in the
    queue or taken by a worker; `at` is that moment (`time.time()`)."""

    def __init__(self, farm: Farm) -> None:
        self.redis, self.at = farm.redis(), 0.0
        self.queue = Settings().queue_name
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def start(self) -> None:
        # The last run's acknowledgements may still be on their way through the proxy.
        wait_for(lambda: self.waiting() == 0, 30, "the jobs of the last run to leave Redis")
        self.thread.start()

    def waiting(self) -> int:
        queued, taken = self.redis.pipeline().llen(self.queue).hlen("unacked").execute()
        return int(queued) + int(taken)

    def watch(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.waiting():
                self.at = time.time()
                return
            time.sleep(0.005)

    def join(self) -> float:
        """The moment, once the enqueue has returned (its jobs are in Redis by then)."""
        self.thread.join(timeout=10)
        assert self.at, "no job was seen in Redis"
        return self.at


def last_caption_at(run: Run) -> float:
    """When the last caption of the run's images was made (`created`, as `time.time()`)."""
    engine = create_engine(run.farm.db_url)
    try:
        with engine.connect() as conn:
            last = conn.scalar(
                select(func.max(Caption.created))
                .join(Image)
                .where(Image.uri.like(f"%/{run.name}/%"))
            )
    finally:
        engine.dispose()
    assert last is not None, f"{run.name}: no caption"
    return float(last.timestamp())


def crawl_by_url(run: Run) -> tuple[float, float]:
    """Enqueue the run's images as a URI list of URLs through the proxy, wait until every one
    is captioned; how long the enqueue command took, and the workers' window: from the first
    job in Redis to the last caption (the run's wall time is `run.wall_s`)."""
    svc = f"{run.farm.addr(1)}:{PROXY_PORTS[HTTP_PORT]}"
    uris = run.farm.root / f"{run.name}.txt"
    names = sorted(p.name for p in run.folder.iterdir())
    uris.write_text("".join(f"http://{svc}/{run.name}/{name}\n" for name in names))
    first = FirstJob(run.farm)
    first.start()
    run.started = time.monotonic()
    assert run.farm.producer is not None
    enqueue = in_ns(run.farm.producer.ns, str(CAPWORKS), "enqueue", f"@{uris}", "--no-progress")
    env = run.farm.env(CAPWORKS_JOB_IMAGES=str(JOB_IMAGES))
    done = subprocess.run(enqueue, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    enqueue_s = time.monotonic() - run.started
    first_at = first.join()
    run.wait()
    return enqueue_s, last_caption_at(run) - first_at


def test_a_50_ms_network_with_loss_loses_nothing_and_keeps_nine_tenths_of_the_rate(
    slow_farm: SlowFarm,
) -> None:
    farm = slow_farm.farm
    walls: dict[str, float] = {"clean": 0.0, "slow": 0.0}
    enqueues: dict[str, float] = {"clean": 0.0, "slow": 0.0}
    workers: dict[str, float] = {"clean": 0.0, "slow": 0.0}
    runs: list[Run] = []
    applied = ""
    for i, phase in enumerate(("clean", "slow", "slow", "clean")):
        run = Run(farm, f"{phase}{i}", images=IMAGES)
        if phase == "slow":
            applied = slow_farm.slow()
        try:
            enqueue_s, workers_s = crawl_by_url(run)
        finally:
            slow_farm.clean()
        enqueues[phase] += enqueue_s
        workers[phase] += workers_s
        walls[phase] += run.wall_s
        runs.append(run)
    # Worker images/s slow over clean (as many images in each): the goal's figure.
    ratio = workers["clean"] / workers["slow"]
    counts = [run.counts() for run in runs]
    figures = {
        "fault": f"slow network: {applied}",
        "images": 4 * IMAGES,
        "lost": sum(run.images - c[0] - c[2] for run, c in zip(runs, counts, strict=True)),
        "rows_per_image": round(sum(c[1] for c in counts) / max(sum(c[0] for c in counts), 1), 3),
        "dead_letters": sum(c[2] for c in counts),
        "jobs_run_twice": sum(len(run.run_twice()) for run in runs),
        "held_at_fault": 0,
        "recovery_s": [],
        "wall_s": round(walls["slow"], 1),
        "clean_wall_s": round(walls["clean"], 1),
        "wall_vs_calm": round(walls["slow"] / walls["clean"], 2),
        "images_per_s_vs_clean": round(ratio, 2),
        "workers_s": {phase: round(t, 2) for phase, t in workers.items()},
        "enqueue_s": {phase: round(t, 1) for phase, t in enqueues.items()},
        "wall_images_per_s_vs_clean": round(walls["clean"] / walls["slow"], 2),
    }
    print(f"\nfarm: {json.dumps(figures)}")
    if OUT:
        with open(OUT, "a") as out:
            out.write(json.dumps(figures) + "\n")
    assert (figures["lost"], figures["dead_letters"], figures["jobs_run_twice"]) == (0, 0, 0)
    assert figures["rows_per_image"] == 1.0, figures
    assert ratio >= GOAL - MARGIN, figures
