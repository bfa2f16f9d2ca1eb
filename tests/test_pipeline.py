"""The distributed pipeline end to end: `capworks enqueue` from a real S3 server into the real
Redis, real Celery worker processes with the shapes model, captions in the real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import png_bytes, s3_client
from PIL import Image
from pipeline_support import (
    REDIS_URL,
    Pipeline,
    assert_mostly_true,
    captions,
    count_rows,
    failures,
    free_port,
    get_json,
    instance_of,
    make_bucket,
    queued_images,
    scrape,
    wait_until,
)

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.enqueue import enqueue
from capworks.schema.queue import CAPTION_TASK
from capworks.schema.settings import Settings
from capworks.workers.leases import hand_back

pytestmark = pytest.mark.slow
WRAPPERS = Path(__file__).parent / "wrappers"


def test_bucket_of_500_images_is_captioned_once_despite_a_killed_worker(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    p = pipeline
    bucket = make_bucket(p.s3_endpoint, "library", 500, seed=41)
    expected = bucket.expected(shapes_engine)
    result = p.cli("enqueue", "s3://library/", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "enqueued 500" in result.stdout
    worker = p.start_worker("first")
    wait_until(
        lambda: count_rows(p.db_url)["captions"] >= 100,
        600,
        "100 captions",
        lambda: p.log_text("first")[-3000:],
    )
    os.kill(worker.pid, signal.SIGKILL)  # mid-run: jobs it held are unacknowledged
    worker.wait()
    # The kill interrupted work: images were left, and jobs were held by the dead process.
    assert count_rows(p.db_url)["captions"] < 500
    assert p.redis().hlen("unacked") > 0
    p.start_worker("second")
    wait_until(
        lambda: count_rows(p.db_url)["captions"] == 500 and p.queue_length() == 0,
        900,
        "all 500 captions and an empty queue",
        lambda: p.log_text("second")[-3000:],
    )
    assert captions(p.db_url) == expected
    assert_mostly_true(captions(p.db_url), bucket.truth)
    rows = count_rows(p.db_url)
    assert (rows["images"], rows["captions"], rows["failures"]) == (500, 500, 0)
    # Re-running the finished crawl enqueues nothing: every object is already captioned.
    again = p.cli("enqueue", "s3://library/", "--no-progress")
    assert again.returncode == 0 and "enqueued 0" in again.stdout, again.stdout


def test_killed_producer_resumes_without_enqueueing_anything_twice(pipeline: Pipeline) -> None:
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "resume", 300, seed=42).truth
    p.extra_env.update(CAPWORKS_JOB_IMAGES="10", CAPWORKS_MAX_QUEUED_IMAGES="100")
    # No worker runs, so backpressure holds the producer at ~100 queued images: kill it there.
    producer = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "enqueue", "s3://resume/", "--no-progress"],
        env=p.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(lambda: len(queued_images(p)) >= 100, 120, "the producer to fill the queue")
    time.sleep(1.0)
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    first = queued_images(p)
    assert 100 <= len(first) < 300
    p.extra_env["CAPWORKS_MAX_QUEUED_IMAGES"] = "100000"
    result = p.cli("enqueue", "s3://resume/", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "resumed after" in result.stdout
    every = queued_images(p)
    assert sorted(every) == sorted(expected)  # each object exactly once across both runs


def test_bad_objects_become_dead_letters_and_replay_captions_a_fixed_one(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "mixed", 40, seed=43).expected(shapes_engine)
    s3 = s3_client(p.s3_endpoint)
    bad = {
        "bad/corrupt.jpg": b"\xff\xd8\xff\xe0 this is no jpeg at all" * 10,
        "bad/empty.png": b"",
        "bad/gone.png": png_bytes(sample_scenes(1, 5)[0][0]),
    }
    for key, body in bad.items():
        s3.put_object(Bucket="mixed", Key=key, Body=body)  # type: ignore[attr-defined]
    s3.put_object(
        Bucket="mixed",
        Key="bad/huge.png",  # type: ignore[attr-defined]
        Body=png_bytes(Image.new("L", (3200, 100))),
    )
    p.extra_env["CAPWORKS_JOB_IMAGES"] = "16"
    result = p.cli("enqueue", "s3://mixed/", "--no-progress")
    assert result.returncode == 0, result.stderr
    s3.delete_object(Bucket="mixed", Key="bad/gone.png")  # deleted after listing
    p.start_worker()
    wait_until(
        lambda: (
            sum(count_rows(p.db_url)[k] for k in ("captions", "failures")) == 44
            and p.queue_length() == 0
        ),
        600,
        "44 outcomes",
        lambda: p.log_text()[-3000:],
    )
    assert captions(p.db_url) == expected
    assert failures(p.db_url) == {
        "s3://mixed/bad/corrupt.jpg": "undecodable",
        "s3://mixed/bad/empty.png": "empty",
        "s3://mixed/bad/gone.png": "not_found",
        "s3://mixed/bad/huge.png": "too_large_pixels",
    }
    listed = p.cli("dlq", "list", "--code", "not_found", "--json")
    assert listed.returncode == 0 and "bad/gone.png" in listed.stdout
    fixed = png_bytes(sample_scenes(1, 77)[0][0])
    fixed_caption = shapes_engine.caption_images([fixed])[0].caption.text  # type: ignore[attr-defined]
    s3.put_object(Bucket="mixed", Key="bad/gone.png", Body=fixed)  # type: ignore[attr-defined]
    replay = p.cli("dlq", "replay", "--prefix", "s3://mixed/bad/gone", "--rate", "5/s")
    assert replay.returncode == 0 and "replayed 1" in replay.stdout, replay.stderr
    wait_until(lambda: "s3://mixed/bad/gone.png" in captions(p.db_url), 120, "the replayed image")
    assert captions(p.db_url)["s3://mixed/bad/gone.png"] == fixed_caption
    assert "s3://mixed/bad/gone.png" not in failures(p.db_url)


def test_two_workers_share_a_queue_and_batch_single_image_jobs(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "uploads", 48, seed=44).expected(shapes_engine)
    p.extra_env.update(CAPWORKS_JOB_IMAGES="1", CAPWORKS_MAX_BATCH_WAIT_MS="400")
    result = p.cli("enqueue", "s3://uploads/", "--no-progress")
    assert result.returncode == 0 and "in 48 jobs" in result.stdout, result.stdout
    ports = {"a": free_port(), "b": free_port()}
    for name, port in ports.items():
        p.start_worker(name, concurrency=8, metrics_port=port)
    wait_until(
        lambda: count_rows(p.db_url)["captions"] == 48 and p.queue_length() == 0,
        600,
        "48 captions",
        lambda: p.log_text("a")[-2000:] + p.log_text("b")[-2000:],
    )
    assert captions(p.db_url) == expected
    # The batch-size histogram of both processes: 48 images in fewer than 48 batches.
    found = [scrape(port) for port in ports.values()]
    images = sum(m[("capworks_batch_images_sum", frozenset())] for m in found)
    batches = sum(m[("capworks_batch_images_count", frozenset())] for m in found)
    singles = sum(m[("capworks_batch_images_bucket", frozenset({("le", "1.0")}))] for m in found)
    assert images == 48 and batches < 48 and singles < batches
    logs = p.log_text("a") + p.log_text("b")
    sizes = [
        int(line.split("batch of ")[1].split()[0])
        for line in logs.splitlines()
        if "batch of " in line
    ]
    assert sum(sizes) == 48 and max(sizes) > 1
    assert "Task capworks.caption_job" in p.log_text(
        "a"
    ) and "Task capworks.caption_job" in p.log_text("b")


def test_transient_s3_outage_is_retried_with_backoff_and_ends_captioned(
    pg_url: str, own_s3_server: object, shapes_engine: object, tmp_path: Path
) -> None:
    server = own_s3_server
    p = Pipeline(pg_url, server.endpoint, tmp_path)  # type: ignore[attr-defined]
    p.extra_env.update(CAPWORKS_JOB_IMAGES="4", CAPWORKS_MAX_ATTEMPTS="8")
    try:
        expected = make_bucket(p.s3_endpoint, "flaky", 24, seed=45).expected(shapes_engine)
        assert p.cli("enqueue", "s3://flaky/", "--no-progress").returncode == 0
        server.stop()  # type: ignore[attr-defined]
        p.start_worker("flaky")
        wait_until(
            lambda: "failed transiently" in p.log_text("flaky"),
            180,
            "a transient failure",
            lambda: p.log_text("flaky")[-3000:],
        )
        server.start()  # type: ignore[attr-defined]
        wait_until(
            lambda: count_rows(p.db_url)["captions"] == 24 and p.queue_length() == 0,
            300,
            "24 captions after the outage",
            lambda: p.log_text("flaky")[-3000:],
        )
        assert captions(p.db_url) == expected
        assert failures(p.db_url) == {}
        assert "storage_unavailable" in p.log_text("flaky")
    finally:
        p.stop_workers()


def run_crash_workers(p: Pipeline, name: str, concurrency: int, done: Callable[[], bool]) -> int:
    """Run the crash-wrapper worker until `done()`, starting a fresh one each time it dies (the
    supervisor's job in `capworks worker`); returns how many times it died."""
    deaths = 0
    deadline = time.monotonic() + 400
    wrapper = WRAPPERS / "fake_crash_worker.py"
    worker = p.start_worker(name, wrapper, concurrency=concurrency)
    instance = instance_of(worker.pid)
    while time.monotonic() < deadline and not done():
        if worker.poll() is not None:
            deaths += 1
            # What `capworks worker`'s supervisor does when a child dies: its jobs go back now.
            hand_back(p.redis(), instance)
            worker = p.start_worker(name, wrapper, concurrency=concurrency)
            instance = instance_of(worker.pid)
        time.sleep(1.0)
    return deaths


def test_a_job_that_kills_its_worker_is_split_and_the_culprit_dead_lettered(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "crashy", 6, seed=46).expected(shapes_engine)
    s3_client(p.s3_endpoint).put_object(  # type: ignore[attr-defined]
        Bucket="crashy", Key="zz/kills-worker.png", Body=png_bytes(sample_scenes(1, 3)[0][0])
    )
    p.extra_env.update(
        CAPWORKS_JOB_IMAGES="16",
        CAPWORKS_POISON_DELIVERIES="2",
    )
    result = p.cli("enqueue", "s3://crashy/", "--no-progress")
    assert result.returncode == 0 and "in 1 jobs" in result.stdout, result.stdout
    deaths = run_crash_workers(
        p,
        "poisoned",
        1,
        lambda: (
            "s3://crashy/zz/kills-worker.png" in failures(p.db_url) and len(captions(p.db_url)) == 6
        ),
    )
    assert failures(p.db_url) == {"s3://crashy/zz/kills-worker.png": "poison"}, p.log_text(
        "poisoned"
    )[-3000:]
    assert captions(p.db_url) == expected
    assert deaths == 4  # twice as a 7-image job, twice alone
    assert "splitting its 7 images" in p.log_text("poisoned")


def test_innocent_jobs_running_beside_a_worker_killer_are_not_dead_lettered(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    """Three slow single-image jobs run beside one that kills the process: all four are charged
    with the first death. On redelivery each suspect runs alone, so only the killer is charged
    again and dead-lettered; the innocents are captioned."""
    p = pipeline
    s3 = s3_client(p.s3_endpoint)
    s3.create_bucket(Bucket="crowded")  # type: ignore[attr-defined]
    blobs = {f"slow/{i}.png": png_bytes(img) for i, (img, _) in enumerate(sample_scenes(3, 48))}
    blobs["zz/kills-worker.png"] = png_bytes(sample_scenes(1, 49)[0][0])
    for key, body in blobs.items():
        s3.put_object(Bucket="crowded", Key=key, Body=body)  # type: ignore[attr-defined]
    innocents = [f"s3://crowded/{k}" for k in blobs if k.startswith("slow/")]
    texts = shapes_engine.caption_images([blobs[u.split("/", 3)[3]] for u in innocents])  # type: ignore[attr-defined]
    expected = {u: r.caption.text for u, r in zip(innocents, texts, strict=True)}
    p.extra_env.update(
        CAPWORKS_JOB_IMAGES="1",
        CAPWORKS_POISON_DELIVERIES="2",
    )
    result = p.cli("enqueue", "s3://crowded/", "--no-progress")
    assert result.returncode == 0 and "in 4 jobs" in result.stdout, result.stdout
    deaths = run_crash_workers(
        p,
        "crowded",
        4,
        lambda: len(failures(p.db_url)) + len(captions(p.db_url)) == 4 and p.queue_length() == 0,
    )
    log_text = p.log_text("crowded")[-4000:]
    assert failures(p.db_url) == {"s3://crowded/zz/kills-worker.png": "poison"}, log_text
    assert captions(p.db_url) == expected
    assert deaths == 2, log_text  # once beside the innocents, once alone


def test_a_worker_that_cannot_load_its_model_exits_and_leaves_the_jobs_queued(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    enqueue(["s3://nowhere/a.png", "s3://nowhere/b.png"], settings)
    p.extra_env["CAPWORKS_MODEL"] = str(p.tmp / "no-such-checkpoint")
    worker = p.start_worker("broken")
    assert worker.wait(timeout=120) != 0
    assert "cannot start the worker" in p.log_text("broken"), p.log_text("broken")[-2000:]
    assert p.redis().llen(p.queue) == 1  # the job still waits: the worker never took it


def test_capworks_worker_restarts_a_killed_process_and_stops_cleanly(
    pipeline: Pipeline, shapes_engine: object
) -> None:
    """The supervisor itself (`capworks worker --gpus cpu`): its Celery process is killed with
    SIGKILL, a new one takes over and captions the bucket; SIGTERM stops everything."""
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "supervised", 8, seed=50).expected(shapes_engine)
    port = free_port()
    log = (p.tmp / "supervisor.log").open("ab")
    supervisor = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "worker", "--gpus", "cpu"],
        env={**p.env, "CAPWORKS_METRICS_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_until(lambda: _answers(url), 120, "the first worker process")
        first = _children(supervisor.pid)
        assert len(first) == 1
        os.kill(first[0], signal.SIGKILL)
        wait_until(
            lambda: _children(supervisor.pid) not in ([], first) and _answers(url),
            120,
            "a new worker process",
            lambda: (p.tmp / "supervisor.log").read_text()[-2000:],
        )
        assert p.cli("enqueue", "s3://supervised/", "--no-progress").returncode == 0
        wait_until(lambda: len(captions(p.db_url)) == 8, 300, "8 captions")
        assert captions(p.db_url) == expected
        assert "exited with -9; restarting" in (p.tmp / "supervisor.log").read_text()
        second = _children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in second)  # stopped with it
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for pid in _children(supervisor.pid):
            os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def test_flower_and_prometheus_watch_the_work(pipeline: Pipeline, shapes_engine: object) -> None:
    """Flower, started on nothing but the broker URL, sees every job succeed on the worker; the
    worker's /metrics counts the captions, the dead letter and the batches."""
    p = pipeline
    expected = make_bucket(p.s3_endpoint, "watched", 12, seed=47).expected(shapes_engine)
    s3_client(p.s3_endpoint).put_object(  # type: ignore[attr-defined]
        Bucket="watched", Key="zz/corrupt.jpg", Body=b"\xff\xd8\xff\xe0 not a jpeg" * 10
    )
    p.extra_env["CAPWORKS_JOB_IMAGES"] = "4"
    flower_port, metrics_port = free_port(), free_port()
    flower_log = (p.tmp / "flower.log").open("ab")
    flower = subprocess.Popen(  # as the README starts it: the broker URL in the environment
        [
            str(Path(sys.executable).parent / "celery"),
            "flower",
            "--address=127.0.0.1",
            f"--port={flower_port}",
        ],
        env={**p.env, "CELERY_BROKER_URL": REDIS_URL, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=flower_log,
        stderr=subprocess.STDOUT,
    )
    flower_url = f"http://127.0.0.1:{flower_port}"
    try:
        wait_until(lambda: _answers(f"{flower_url}/healthcheck"), 60, "Flower to start")
        p.start_worker("watched", metrics_port=metrics_port)
        assert p.cli("enqueue", "s3://watched/", "--no-progress").returncode == 0
        wait_until(
            lambda: len(captions(p.db_url)) == 12 and p.queue_length() == 0,
            300,
            "12 captions",
            lambda: p.log_text("watched")[-3000:],
        )
        assert captions(p.db_url) == expected

        def succeeded() -> list[dict[str, object]]:
            tasks = get_json(f"{flower_url}/api/tasks").values()
            return [t for t in tasks if t["name"] == CAPTION_TASK and t["state"] == "SUCCESS"]

        wait_until(lambda: len(succeeded()) == 4, 60, "Flower to see 4 finished jobs")
        assert all(str(t["worker"]).startswith("watched-") for t in succeeded())
        # The last job holds only the corrupt image: SUCCESS (handled), and its result says so.
        results = sorted(str(t["result"]) for t in succeeded())
        assert sum("'outcome': 'all dead-lettered'" in r for r in results) == 1, results
        assert sum("'captioned': 4" in r and "outcome" not in r for r in results) == 3, results
        # A first attempt's arguments name the job (a retry's add "(attempt N)"), no bare number.
        assert all(str(t["args"]).startswith("[job ") for t in succeeded())
        # capworks status names each worker as Flower does.
        shown = json.loads(p.cli("status", "--json").stdout)
        nodes = {w["heartbeat"]["node"] for w in shown["workers"]}
        assert nodes == {str(t["worker"]) for t in succeeded()}, nodes
        p.extra_env["COLUMNS"] = "200"
        table = p.cli("status").stdout
        assert all(node in table for node in nodes), table

        metrics = scrape(metrics_port)
        assert metrics[("capworks_images_total", _labels(outcome="captioned", code=""))] == 12
        dead = ("capworks_images_total", _labels(outcome="dead_letter", code="undecodable"))
        assert metrics[dead] == 1
        assert metrics[("capworks_jobs_total", _labels(result="done"))] == 4
        assert metrics[("capworks_batch_images_sum", frozenset())] == 12
        assert metrics[("capworks_write_seconds_count", frozenset())] == 4
    finally:
        flower.terminate()
        flower.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())
