"""`capworks status` and `capworks health` against the real Redis and PostgreSQL.

Jobs are published through the real Celery publisher, and one is held the way a worker holds
it (received through kombu's Redis transport, not acknowledged, so it sits in `unacked`).
Most heartbeats are written by calling `schema.heartbeat.beat` directly, from a thread standing
in for a worker's batch loop (so a hung one can be made); the last test runs a real worker,
whose model thread beats.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REPO, run_cli
from pipeline_support import live_redis, wait_until
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from capworks.commands.status import throughput_text
from capworks.farm import EXACT_JOBS, images_in_message, read_queue
from capworks.farm_metrics import FAMILIES
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.errors import Code, ImageError
from capworks.schema.heartbeat import (
    Heartbeat,
    beat,
    forget,
    heartbeat_key,
    read_heartbeats,
    redis_now,
)
from capworks.schema.jobs import Job
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Crawl, utcnow
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Caption as EngineCaption
from capworks.workers.engine import CaptionedImage
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"
CLOSED_PORT_URL = "redis://127.0.0.1:9/0"  # the discard port: nothing listens on loopback
METRICS_TOKEN = "farm-metrics-token-7d1e"


def closed_pg_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"


@pytest.fixture()
def queue() -> Iterator[str]:
    """A queue name of this test's own on the real Redis; its keys removed afterwards."""
    name = f"capworks-status-{uuid.uuid4().hex[:8]}"
    r = live_redis()
    yield name
    r.delete(name, *r.scan_iter(f"capworks:heartbeat:{name}:*"))
    leftovers = [*r.scan_iter(f"_kombu.binding*.{name}"), *r.scan_iter("capworks:sent:*")]
    if leftovers:
        r.delete(*leftovers)
    for tag, raw in r.hgetall("unacked").items():
        if json.loads(raw)[2] == name:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)


def settings_for(queue: str) -> Settings:
    return Settings(broker_url=REDIS_URL, queue_name=queue)


def cli_env(queue: str, stale_s: float = 60) -> dict[str, str]:
    return {
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": queue,
        "CAPWORKS_HEARTBEAT_STALE_S": str(stale_s),
    }


def publish(queue: str, *sizes: int) -> None:
    """Jobs of these many images, through the producer's real Celery publisher."""
    from capworks.producer.enqueue import make_publisher

    publisher = make_publisher(settings_for(queue))
    for n, size in enumerate(sizes):
        refs = [ImageRef(f"s3://b/{queue}/{n}/{i}.jpg", etag="e") for i in range(size)]
        publisher.publish(Job.new(refs))


def captioned(text: str) -> CaptionedImage:
    return CaptionedImage(EngineCaption(text, -0.5, (), (1,), ()), 8, 8)


def fill_database(url: str) -> None:
    """Three captions now, one two hours ago, one dead letter, a running and a done crawl."""
    db = connect(url)
    writer = ResultWriter(db, CheckpointConfig(Path("."), "m", ""))
    writer.save([Outcome(ImageRef(f"/p/{n}.png"), captioned("a cat")) for n in range(4)])
    writer.save([Outcome(ImageRef("/p/bad.png"), ImageError(Code.TRUNCATED, "truncated"))])
    now = utcnow()
    with Session(db) as session, session.begin():
        session.execute(
            update(Caption).where(Caption.id == 1).values(created=now - timedelta(hours=2))
        )
        session.add_all(
            [
                Crawl(
                    id="c1",
                    source="s3://b/new/",
                    state="running",
                    listed=3000,
                    skipped=1000,
                    enqueued=2000,
                    jobs=32,
                    created=now - timedelta(seconds=100),
                    updated=now,
                ),
                Crawl(id="c0", source="s3://b/old/", state="done", listed=5, created=now),
            ]
        )
    db.dispose()


def test_status_json_shows_queue_held_jobs_last_hour_crawls_and_workers(
    queue: str, pg_url: str
) -> None:
    fill_database(pg_url)
    publish(queue, 7, 64, 64, 5)  # the 7-image job is the oldest: the one a worker takes
    r = redis.Redis.from_url(REDIS_URL)
    beat(r, device="cuda:0", model="m", queue=queue, jobs_in_flight=2, started_at=time.time())
    stale = Heartbeat("b1", "gpu-b", 4242, "cuda:1", "m", queue, 1, 0, 0.0, time.time() - 300)
    r.set(stale.key, stale.to_json(), ex=60)
    app = make_celery(settings_for(queue))
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        simple.get(timeout=5)  # held, as a worker's prefetched job, until the channel closes
        done = run_cli("status", "--json", "--db", pg_url, env=cli_env(queue))
        simple.close()
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["queue"] == {
        "jobs_waiting": 3,
        "images_waiting": 133,
        "images_estimated": False,
        "jobs_held": 1,
        "images_held": 7,
    }
    assert status["activity"]["captioned_last_hour"] == 3
    assert status["activity"]["dead_lettered_last_hour"] == 1
    assert status["activity"]["captioned_per_s"] == pytest.approx(3 / 300)
    assert status["drain_eta_s"] == pytest.approx(140 / (3 / 300))
    assert [c["id"] for c in status["crawls"]] == ["c1", "c0"]
    assert status["crawls"][0]["listed_per_s"] == pytest.approx(30, rel=0.05)
    workers = {w["heartbeat"]["pid"]: w for w in status["workers"]}
    assert set(workers) == {os.getpid(), 4242}
    assert workers[os.getpid()]["heartbeat"]["device"] == "cuda:0"
    assert not workers[os.getpid()]["stale"] and workers[4242]["stale"]


def test_a_ctrl_c_during_a_read_that_waits_ends_the_watch_after_it_and_a_second_at_once(
    queue: str, pg_url: str
) -> None:
    """The first SIGINT does not cancel the read in progress (psycopg's cancel and wait for
    the server, under load, outlasted 20 s); a second one does."""
    watch = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "status", "--watch", "--json"]
        + ["--interval", "0.2s", "--db", pg_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **cli_env(queue)},
        cwd=REPO,
    )
    assert watch.stdout is not None and watch.stderr is not None
    json.loads(watch.stdout.readline())  # it reads the farm
    db = connect(pg_url)
    try:
        with db.connect() as lock, db.connect() as look:
            lock.execute(text("LOCK TABLE crawls IN ACCESS EXCLUSIVE MODE"))
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            wait_until(lambda: look.scalar(waiting) == 1, 30, "the watch's read to wait")
            watch.send_signal(signal.SIGINT)
            time.sleep(1.0)  # the read is not cancelled: the watch is still waiting on it
            assert watch.poll() is None
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=20) == 0  # with the lock still held
            lock.rollback()
    finally:
        db.dispose()
        watch.kill()
    assert "Traceback" not in watch.stderr.read()


def test_a_rate_below_a_tenth_per_second_is_shown_as_a_count_not_as_zero(
    queue: str, pg_url: str
) -> None:
    fill_database(pg_url)  # 3 captions in the last five minutes: 0.01 images/s
    shown = run_cli("status", "--db", pg_url, env={**cli_env(queue), "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "3 images captioned in the last 5 min" in shown.stdout, shown.stdout
    assert "0.0 images/s" not in shown.stdout
    assert throughput_text(1 / 300, 300) == "1 image captioned in the last 5 min"
    assert throughput_text(0.25, 300) == "0.2 images/s (last 5 min)"


def test_status_with_no_worker_says_so_and_watch_refreshes(queue: str, pg_url: str) -> None:
    shown = run_cli("status", "--db", pg_url, env=cli_env(queue))
    assert shown.returncode == 0, shown.stderr
    assert "no worker is running" in shown.stdout
    assert "0 jobs, 0 images waiting" in shown.stdout
    watch = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "status", "--watch", "--json"]
        + ["--interval", "0.2s", "--db", pg_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **cli_env(queue)},
        cwd=REPO,
    )
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())
    publish(queue, 3)
    deadline = time.monotonic() + 20
    while json.loads(watch.stdout.readline())["queue"]["images_waiting"] != 3:
        assert time.monotonic() < deadline, "the watch never showed the new job"
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=20) == 0
    assert first["queue"]["jobs_waiting"] == 0 and first["workers"] == []


def test_redis_or_database_down_is_named_in_one_line_and_exits_1(queue: str, pg_url: str) -> None:
    cases = {
        "redis": ({**cli_env(queue), "CAPWORKS_BROKER_URL": CLOSED_PORT_URL}, pg_url),
        "database": (cli_env(queue), closed_pg_url()),
        "both": ({**cli_env(queue), "CAPWORKS_BROKER_URL": CLOSED_PORT_URL}, closed_pg_url()),
    }
    for case, (env, db_url) in cases.items():
        for command in ("status", "health"):
            done = run_cli(command, "--db", db_url, env=env, timeout=60)
            assert done.returncode == 1, (case, command, done.stdout, done.stderr)
            out = (done.stdout + done.stderr).strip()
            assert "cannot reach the broker (Redis) at redis://127.0.0.1:9/0" in out or (
                case == "database"
            )
            assert "database is unreachable" in out or case == "redis"
            if command == "status":
                assert out.count("\n") == 0, out


class FakeBatchLoop:
    """A worker's batch loop reduced to its heartbeat: beats every 0.1 s until it 'hangs'."""

    def __init__(self, queue: str) -> None:
        self.queue, self.hung, self.beating = queue, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        r, started = redis.Redis.from_url(REDIS_URL), time.time()
        while not self.hung.is_set():
            beat(r, device="cpu", model="shapes", queue=self.queue, jobs_in_flight=1,
                 images_waiting=3, started_at=started)  # fmt: skip
            self.beating.set()
            time.sleep(0.1)


def test_health_follows_the_heartbeat_of_this_host(queue: str, pg_url: str) -> None:
    host = socket.gethostname()
    env = cli_env(queue, stale_s=1.5)
    missing = run_cli("health", "--worker", "--db", pg_url, env=env)
    assert missing.returncode == 1
    assert "no worker heartbeat from this host" in missing.stdout
    loop = FakeBatchLoop(queue)
    assert loop.beating.wait(10), "the loop never beat"
    healthy = run_cli("health", "--worker", "--db", pg_url, env=env)
    assert healthy.returncode == 0, healthy.stdout
    assert f"worker {host}:{os.getpid()} (cpu) beat" in healthy.stdout
    loop.hung.set()  # the model thread hangs: Celery would still answer, the beats stop
    loop.thread.join()
    r = redis.Redis.from_url(REDIS_URL)

    def stale() -> bool:
        beats = read_heartbeats(r, queue)
        return bool(beats) and all(hb.age_s(redis_now(r)) > 1.5 for hb in beats)

    wait_until(stale, 10, "the last beat to be older than 1.5 s on Redis's clock")
    hung = run_cli("health", "--worker", "--no-database", "--db", pg_url, env=env)
    assert hung.returncode == 1
    assert "stale after 1.5 s" in hung.stdout and "hung" in hung.stdout
    # A heartbeat left by a process of this host that no longer exists is not a live worker.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    forget(r, queue)
    beat(r, device="cpu", model="m", queue=queue, jobs_in_flight=0, started_at=0,
         pid=int(dead.stdout))  # fmt: skip
    gone = run_cli("health", "--worker", "--db", pg_url, env=env)
    assert gone.returncode == 1 and "no worker heartbeat from this host" in gone.stdout
    # A twin container: this hostname and a pid that exists here, but another pid namespace.
    # It is neither this container's worker (`--worker` is unhealthy) nor judged gone by pid.
    forget(r, queue)
    twin = beat(r, device="cpu", model="m", queue=queue, jobs_in_flight=0, instance="twin",
                pid=os.getpid())  # fmt: skip
    r.set(twin.key, replace(twin, pid_space="another-boot/4026531836").to_json(), ex=60)
    not_mine = run_cli("health", "--worker", "--no-database", "--db", pg_url, env=env)
    assert not_mine.returncode == 1, not_mine.stdout
    assert "no worker heartbeat from this host" in not_mine.stdout
    r.set(twin.key, replace(twin, pid=2**22 + 7, pid_space="another-boot/1").to_json(), ex=60)
    shown = run_cli("status", "--json", "--db", pg_url, env=env)
    assert [w["gone"] for w in json.loads(shown.stdout)["workers"]] == [False], shown.stdout
    other = run_cli("health", "--host", "elsewhere", "--db", pg_url, env=env)
    assert other.returncode == 1 and "no worker heartbeat from host elsewhere" in other.stdout


def test_heartbeats_expire_and_are_kept_apart_by_queue(queue: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    mine = beat(r, device="cuda:0", model="m", queue=queue, jobs_in_flight=4, started_at=1.0,
                ttl_s=30)  # fmt: skip
    beat(r, device="cpu", model="m", queue=f"{queue}:other", jobs_in_flight=0, started_at=1.0)
    r.set(heartbeat_key(queue, "junk"), "not json")
    try:
        assert read_heartbeats(r, queue) == [mine]
        assert 0 < r.ttl(mine.key) <= 30
        assert Heartbeat.from_json(mine.to_json()) == mine
        forget(r, queue)
        assert read_heartbeats(r, queue) == []
    finally:
        r.delete(*r.scan_iter(f"capworks:heartbeat:{queue}*"))


def test_images_are_estimated_from_both_ends_of_a_long_queue(queue: str) -> None:
    publish(queue, *([2] * 6), *([4] * 6))
    r: Any = redis.Redis.from_url(REDIS_URL)
    exact = read_queue(r, queue)
    assert (exact.jobs_waiting, exact.images_waiting, exact.images_estimated) == (12, 36, False)
    estimated = read_queue(r, queue, exact_jobs=5, sample_jobs=2)
    assert estimated.images_estimated and estimated.images_waiting == 36  # (2+2+4+4)/4 * 12
    assert images_in_message(b"not a message") == 0
    assert images_in_message(json.dumps({"body": "bm90IGpzb24="})) == 0
    assert EXACT_JOBS >= 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_metrics_exports_queue_dead_letters_and_workers_to_the_token_holder(
    queue: str, pg_url: str
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fill_database(pg_url)
    publish(queue, 64, 10)
    r = redis.Redis.from_url(REDIS_URL)
    beat(r, device="cuda:0", model="m", queue=queue, jobs_in_flight=1, started_at=time.time())
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "status", "--serve-metrics", str(port),
         "--db", pg_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **cli_env(queue), "CAPWORKS_METRICS_HOST": "127.0.0.1",
             "CAPWORKS_METRICS_TOKEN": METRICS_TOKEN},
        cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert f"127.0.0.1:{port}/metrics" in line and METRICS_TOKEN not in line
        for wrong in ({}, {"Authorization": "Bearer not-the-token"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=wrong), timeout=10)
            assert refused.value.code == 401
        right = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        with urllib.request.urlopen(right, timeout=10) as response:
            body = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("capworks_queue_jobs", (("state", "waiting"),))] == 2
        assert samples[("capworks_queue_images", (("state", "waiting"),))] == 74
        assert samples[("capworks_workers", (("state", "ok"),))] == 1
        assert samples[("capworks_captioned_last_hour", ())] == 3
        assert samples[("capworks_dead_letters", (("code", "truncated"),))] == 1
        assert samples[("capworks_farm_up", (("part", "redis"),))] == 1
        assert samples[("capworks_farm_up", (("part", "database"),))] == 1
        # What the dashboard test checks against is what a scrape holds.
        assert {name for name, _labels in samples} == set(FAMILIES)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0


@pytest.mark.slow
def test_a_real_workers_model_thread_beats_and_health_follows_it(
    pg_url: str, shapes_dir: Path, tmp_path: Path
) -> None:
    from pipeline_support import own_queue

    with own_queue(pg_url, tmp_path) as p:
        worker = p.start_worker("beating")
        env = {k: v for k, v in p.env.items() if k.startswith("CAPWORKS_")}
        deadline = time.monotonic() + 180
        while run_cli("health", "--worker", "--db", pg_url, env=env).returncode != 0:
            assert worker.poll() is None, p.log_text("beating")
            assert time.monotonic() < deadline, "the worker never beat"
            time.sleep(1)
        status = json.loads(run_cli("status", "--json", "--db", pg_url, env=env).stdout)
        (seen,) = status["workers"]
        assert seen["heartbeat"]["pid"] == worker.pid
        assert seen["heartbeat"]["model"] == "shapes"
        p.stop_workers()  # a clean stop removes the heartbeat
        gone = run_cli("health", "--worker", "--db", pg_url, env=env)
        assert gone.returncode == 1, gone.stdout + gone.stderr
