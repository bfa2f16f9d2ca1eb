"""Helpers for pipeline tests: real worker subprocesses, the real Redis, S3 buckets of images."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from conftest import REPO, png_bytes, require_service, s3_client
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.commands.worker import celery_worker_argv
from capworks.schema.redis_transport import REGISTRY_KEY, as_text, queue_of
from capworks.schema.tables import Caption, Failure, Image

# Each concurrent test run takes its own Redis database (CAPWORKS_TEST_REDIS_DB, default 15): the
# fixtures clear `capworks:*` keys and count kombu's `unacked` hash, both per database.
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"


def live_redis() -> redis.Redis:
    """A client of the tests' Redis database; skips locally (fails in CI) without a Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    return client


@dataclass
class Pipeline:
    """Environment shared by the producer and workers of one test."""

    db_url: str
    s3_endpoint: str
    tmp: Path
    queue: str = field(default_factory=lambda: f"capworks-test-{uuid.uuid4().hex[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    broker_url: str = REDIS_URL
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CAPWORKS_DATABASE_URL": self.db_url,
            "CAPWORKS_BROKER_URL": self.broker_url,
            "CAPWORKS_QUEUE_NAME": self.queue,
            "CAPWORKS_MODEL": "shapes",
            "CAPWORKS_S3_ENDPOINT_URL": self.s3_endpoint,
            "CAPWORKS_S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "CAPWORKS_RETRY_BASE_S": "1",
            "CAPWORKS_RETRY_CAP_S": "4",
            "CAPWORKS_BATCH_SIZE": "8",
            "PYTHONUNBUFFERED": "1",
            "CAPWORKS_METRICS_PORT": "0",  # a test that scrapes metrics gives each worker a port
            # The tests' http servers listen on loopback, their local images lie under tmp.
            "CAPWORKS_FETCH_ALLOW_CIDRS": "127.0.0.0/8",
            "CAPWORKS_FILE_ROOTS": str(self.tmp),
            **self.extra_env,
        }

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).parent / "capworks"
        return subprocess.run(
            [str(exe), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO,
        )

    def start_worker(
        self,
        name: str = "w",
        wrapper: Path | None = None,
        concurrency: int = 4,
        metrics_port: int = 0,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """A Celery worker process, run directly (the supervisor is not part of these tests);
        `prefix` is a command it runs under (such as `setpriv ...`)."""
        log = (self.tmp / f"{name}.log").open("ab")
        hostname = f"{name}-{uuid.uuid4().hex[:6]}@%h"
        cmd = celery_worker_argv(self.queue, concurrency, hostname)
        if wrapper is not None:  # the same worker, started through a test wrapper script
            cmd[1:6] = [str(wrapper), "worker"]
        cmd = [*prefix, *cmd]
        env = {
            **self.env,
            "CUDA_VISIBLE_DEVICES": "",
            "CAPWORKS_DEVICE": "cpu",
            "CAPWORKS_METRICS_PORT": str(metrics_port),
            "CAPWORKS_INSTANCE_ID": f"{name}-{uuid.uuid4().hex[:12]}",
        }
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        INSTANCES[proc.pid] = env["CAPWORKS_INSTANCE_ID"]
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers.clear()

    def log_text(self, name: str = "w") -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def redis(self) -> Any:
        return redis.Redis.from_url(self.broker_url)

    def queue_length(self) -> int:
        """This queue's jobs in Redis: waiting, fetched but not yet claimed, and delivered but
        not acknowledged. kombu's `unacked` hash (`[message, exchange, routing key]`) and the
        fetching registry hold every queue of the database, so they are filtered by queue."""
        r = self.redis()
        held = sum(json.loads(raw)[2] == self.queue for raw in r.hvals("unacked"))
        fetching = [
            k for k in map(as_text, r.zrange(REGISTRY_KEY, 0, -1)) if queue_of(k) == self.queue
        ]
        return int(r.llen(self.queue)) + held + sum(int(r.llen(k)) for k in fetching)


@contextmanager
def own_queue(
    db_url: str, tmp: Path, s3_endpoint: str = "http://127.0.0.1:9", broker_url: str = REDIS_URL
) -> Iterator[Pipeline]:
    """A producer/worker environment with a queue of its own on the real Redis (or the one at
    `broker_url`); afterwards its workers are stopped and its keys removed. The default S3
    endpoint is a closed port."""
    from conftest import require_service

    p = Pipeline(db_url, s3_endpoint, tmp, broker_url=broker_url)
    try:
        p.redis().ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    try:
        yield p
    finally:
        p.stop_workers()
        r = p.redis()
        r.delete(p.queue)
        for key in r.scan_iter("capworks:*"):
            r.delete(key)


@dataclass(frozen=True)
class Bucket:
    """What a test put in a bucket: each URI's bytes and its true caption."""

    blobs: dict[str, bytes]
    truth: dict[str, str]

    def expected(self, engine: Any) -> dict[str, str]:
        """The caption the engine gives each image in this process: the pipeline must agree."""
        uris = list(self.blobs)
        results = engine.caption_images([self.blobs[u] for u in uris])
        return {u: r.caption.text for u, r in zip(uris, results, strict=True)}


def make_bucket(endpoint: str, bucket: str, count: int, seed: int) -> Bucket:
    """A bucket of synthetic images with awkward keys (spaces, +, non-ASCII, nested prefixes)."""
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    names = ["plain", "with space", "plus+sign", "ünïcödé", "mixed + ü"]
    blobs, truth = {}, {}
    for i, (img, caption) in enumerate(sample_scenes(count, seed)):
        key = f"set{i % 3}/sub{i % 2}/{names[i % len(names)]} {i:04d}.png"
        body = png_bytes(img)
        s3.put_object(Bucket=bucket, Key=key, Body=body)  # type: ignore[attr-defined]
        blobs[f"s3://{bucket}/{key}"] = body
        truth[f"s3://{bucket}/{key}"] = caption
    return Bucket(blobs, truth)


def assert_mostly_true(got: dict[str, str], truth: dict[str, str], floor: float = 0.95) -> None:
    """The shapes model is right on at least `floor` of the images (100% on its held-out set)."""
    right = sum(got.get(uri) == caption for uri, caption in truth.items())
    assert right >= floor * len(truth), f"only {right} of {len(truth)} captions are true"


def query(db_url: str, run: Callable[[Any], Any]) -> Any:
    """Run `run(connection)` against a test database and close everything after."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return run(conn)
    finally:
        engine.dispose()


def captions(db_url: str) -> dict[str, str]:
    stmt = select(Image.uri, Caption.text).join(Caption)
    return query(db_url, lambda conn: dict(conn.execute(stmt).all()))  # type: ignore[no-any-return]


def failures(db_url: str) -> dict[str, str]:
    stmt = select(Image.uri, Failure.code).join(Failure)
    return query(db_url, lambda conn: dict(conn.execute(stmt).all()))  # type: ignore[no-any-return]


def count_rows(db_url: str) -> dict[str, int]:
    tables = (Image, Caption, Failure)
    return query(  # type: ignore[no-any-return]
        db_url,
        lambda conn: {
            t.__tablename__: int(conn.scalar(select(func.count()).select_from(t)) or 0)
            for t in tables
        },
    )


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    on_timeout: Callable[[], str] = lambda: "",
) -> None:
    """Until `check()`; a check that cannot reach Redis (a test restarting it) is tried again,
    any other exception escapes."""
    deadline = time.monotonic() + timeout_s
    unreachable = ""
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            unreachable = f"last try: {exc!r}\n"
        time.sleep(1.0)
    raise AssertionError(
        f"timed out after {timeout_s:.0f} s waiting for {what}\n{unreachable}{on_timeout()}"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    """GET a loopback URL and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A worker's Prometheus metrics: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def queued_images(p: Pipeline) -> list[str]:
    """URIs of every image in the queue's messages, read from Redis without consuming them."""
    import base64

    uris = []
    for raw in p.redis().lrange(p.queue, 0, -1):
        envelope = json.loads(raw)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        uris.extend(item[0] for item in args[0]["images"])
    return uris


# The instance id of each worker process `Pipeline.start_worker` started, by pid: a process that
# died at once (a zombie) no longer shows its environment in /proc.
INSTANCES: dict[int, str] = {}


def instance_of(pid: int) -> str:
    """A worker process's instance id (the `CAPWORKS_INSTANCE_ID` its starter gave it),
    remembered once read: a process killed a moment ago has no readable environment (ESRCH
    while it is a zombie), and the fault harness asks for the instance of its victims."""
    if pid in INSTANCES:
        return INSTANCES[pid]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"CAPWORKS_INSTANCE_ID="):
            INSTANCES[pid] = entry.split(b"=", 1)[1].decode()
            return INSTANCES[pid]
    raise LookupError(f"process {pid} has no CAPWORKS_INSTANCE_ID")
