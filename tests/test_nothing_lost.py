"""Work is never dropped while success is reported: a re-run crawl's new images, a database
outage, malformed messages, values the database cannot store, retries that run out. Real Redis,
PostgreSQL, SeaweedFS and Celery worker processes with the shapes model."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import png_bytes, postgres_cluster
from pipeline_support import (
    Pipeline,
    captions,
    count_rows,
    failures,
    own_queue,
    query,
    wait_until,
)
from redis_server import own_redis
from sqlalchemy import select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.enqueue import enqueue, make_publisher
from capworks.schema.jobs import Job
from capworks.schema.queue import CAPTION_TASK, make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import BadMessage
from capworks.schema.uris import ImageRef

pytestmark = pytest.mark.slow


def write_images(folder: Path, count: int, seed: int, start: int = 0) -> dict[str, bytes]:
    """`count` shapes images as PNG files named from `start` on; returns path -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {}
    for i, (img, _) in enumerate(sample_scenes(count, seed), start=start):
        path = folder / f"img {i:03d}.png"
        path.write_bytes(png_bytes(img))
        blobs[str(path)] = path.read_bytes()
    return blobs


def bad_messages(db_url: str) -> list[tuple[str, str]]:
    stmt = select(BadMessage.job_key, BadMessage.reason).order_by(BadMessage.id)
    return query(db_url, lambda conn: [tuple(r) for r in conn.execute(stmt).all()])  # type: ignore[no-any-return]


def test_a_crawl_run_again_captions_the_images_that_arrived_since(pipeline: Pipeline) -> None:
    p = pipeline
    photos = p.tmp / "photos"
    first = write_images(photos, 8, seed=60)
    p.start_worker()
    run = p.cli("enqueue", str(photos), "--no-progress")
    assert run.returncode == 0 and "enqueued 8 in 1 jobs" in run.stdout, run.stdout + run.stderr
    wait_until(lambda: len(captions(p.db_url)) == 8, 300, "8 captions", lambda: p.log_text())
    second = write_images(photos, 8, seed=61, start=8)
    again = p.cli("enqueue", str(photos), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "listed 16, skipped 8, enqueued 8 in 1 jobs" in again.stdout, again.stdout
    forced = p.cli("enqueue", str(photos), "--no-progress", "--force")
    assert forced.returncode == 0 and "enqueued 16" in forced.stdout, forced.stdout
    wait_until(
        lambda: set(captions(p.db_url)) == set(first) | set(second) and p.queue_length() == 0,
        300,
        "all 16 captions",
        lambda: p.log_text()[-3000:],
    )
    assert "already committed" not in p.log_text()  # three runs, no job id seen twice


def test_a_90_second_database_outage_is_waited_out_and_every_image_captioned(
    pipeline: Pipeline, postgres_control: None
) -> None:
    p = pipeline
    photos = p.tmp / "photos"
    # Enough work that the outage lands mid-run: 48 images (12 jobs of 0.4 s each) were all
    # captioned on a CI machine before PostgreSQL had stopped, and no write ever waited.
    blobs = write_images(photos, 240, seed=62)
    p.extra_env.update(CAPWORKS_JOB_IMAGES="4", CAPWORKS_DATABASE_RETRY_CAP_S="5")
    assert p.cli("enqueue", str(photos), "--no-progress").returncode == 0
    p.start_worker()
    wait_until(lambda: len(captions(p.db_url)) >= 8, 300, "the first captions", p.log_text)
    postgres_cluster("stop")
    # Jobs still queued or held must be written, so the outage is waited out, not missed.
    assert p.queue_length() > 0, "the run ended before the outage began: give it more images"
    time.sleep(90)
    postgres_cluster("start")
    wait_until(
        lambda: set(captions(p.db_url)) == set(blobs) and p.queue_length() == 0,
        300,
        "all 240 captions after the outage",
        lambda: p.log_text()[-3000:],
    )
    assert failures(p.db_url) == {}
    assert len(re.findall(r"database unavailable .* \(wait \d+\)", p.log_text())) >= 3


def test_malformed_messages_are_kept_with_a_reason_and_good_images_beside_them_captioned(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    good = write_images(p.tmp / "photos", 2, seed=63)
    app = make_celery(Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue))
    uri_a, uri_b = sorted(good)

    def send(*args: object, **kwargs: object) -> None:
        app.send_task(CAPTION_TASK, args=list(args), kwargs=kwargs, queue=p.queue)

    send({"v": 1, "id": "no-bucket", "images": [["s3:///k", None, None, None]]})
    send({"v": 1, "id": "bad-attempt", "images": [[uri_a, None, None, None]]}, "two")
    send({"v": 1, "id": "huge", "images": [[uri_a, None, None, None]], "pad": "x" * 5_000_000})
    send({"v": 1, "id": "extra-args", "images": [[uri_a, None, None, None]]}, 1, 2)
    send({"v": 1, "id": "j" * 200, "images": [[uri_a, None, None, None]]})
    long_uri = "s3://b/" + "k" * 3000
    send({"v": 1, "id": "mixed", "images": [[uri_b, None, None, None], [long_uri, None, 1, None]]})
    p.start_worker()
    wait_until(
        lambda: len(bad_messages(p.db_url)) == 6 and uri_b in captions(p.db_url),
        300,
        "six bad messages and the good image's caption",
        lambda: p.log_text()[-3000:],
    )
    reasons = dict(bad_messages(p.db_url))
    assert "no bucket" in reasons["no-bucket"]
    assert "attempt 'two'" in reasons["bad-attempt"]
    assert "bytes; at most" in reasons["huge"]
    assert "positional arguments" in reasons["extra-args"]
    assert "job id is 200 characters" in reasons["j" * 200]
    assert "image entry 1" in reasons["mixed"] and "at most 2048" in reasons["mixed"]
    assert set(captions(p.db_url)) == {uri_b}
    wait_until(lambda: p.queue_length() == 0, 60, "an empty queue")
    assert "Traceback" not in p.log_text()


def test_a_job_already_committed_is_dropped_and_adds_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    blobs = write_images(p.tmp / "photos", 3, seed=64)
    settings = Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue)
    publisher = make_publisher(settings)
    job = Job.new([ImageRef(uri) for uri in sorted(blobs)], job_id="once-only")
    publisher.publish(job)
    p.start_worker()
    wait_until(lambda: len(captions(p.db_url)) == 3, 300, "3 captions", p.log_text)
    created = "SELECT created FROM captions"
    before = query(p.db_url, lambda conn: conn.exec_driver_sql(created).all())
    publisher.publish(job)  # the same id again, as a redelivery would bring it
    wait_until(lambda: "already committed" in p.log_text(), 120, "the copy to be dropped")
    after = query(p.db_url, lambda conn: conn.exec_driver_sql(created).all())
    assert sorted(after) == sorted(before)  # not captioned again
    assert count_rows(p.db_url) == {"images": 3, "captions": 3, "failures": 0}


def test_images_whose_storage_stays_down_end_as_retries_exhausted_after_real_delays(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    p.extra_env.update(
        CAPWORKS_S3_ENDPOINT_URL="http://127.0.0.1:1",  # nothing listens: every fetch fails
        CAPWORKS_MAX_ATTEMPTS="3",
        CAPWORKS_RETRY_BASE_S="4",
        CAPWORKS_RETRY_CAP_S="8",
    )
    settings = Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue)
    enqueue(["s3://down/a.png", "s3://down/b.png"], settings)
    p.start_worker()
    wait_until(
        lambda: len(failures(p.db_url)) == 2, 300, "two dead letters", lambda: p.log_text()[-3000:]
    )
    assert failures(p.db_url) == {
        "s3://down/a.png": "retries_exhausted",
        "s3://down/b.png": "retries_exhausted",
    }
    # Each retry starts no sooner than the delay its log line announced.
    stamp = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
    log_text = p.log_text()
    announced = [
        (_when(m.group(1)), float(m.group(3)), int(m.group(2)))
        for m in re.finditer(stamp + r".*retry (\d+) in ([\d.]+) s", log_text)
    ]
    started = {
        int(m.group(2)): _when(m.group(1))
        for m in re.finditer(stamp + r".*attempt (\d+) starts", log_text)
    }
    assert [a for _, _, a in announced] == [2, 3]
    for at, delay_s, attempt in announced:
        waited_s = (started[attempt] - at).total_seconds()
        assert waited_s >= delay_s - 0.2, (attempt, delay_s, waited_s)


def _when(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_images_over_http_are_fetched_from_a_loopback_server(pipeline: Pipeline) -> None:
    p = pipeline
    served = p.tmp / "www"
    blobs = write_images(served, 3, seed=65)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/{Path(path).name.replace(' ', '%20')}" for path in sorted(blobs)]
    try:
        settings = Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue)
        enqueue([*urls, f"{base}/missing.png"], settings)
        p.start_worker()
        wait_until(
            lambda: len(captions(p.db_url)) == 3 and len(failures(p.db_url)) == 1,
            300,
            "3 captions and a dead letter",
            lambda: p.log_text()[-3000:],
        )
    finally:
        server.shutdown()
        server.server_close()
    assert set(captions(p.db_url)) == set(urls)
    assert failures(p.db_url) == {f"{base}/missing.png": "not_found"}


def test_a_worker_refuses_a_broker_that_would_evict_queued_jobs(
    pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path
) -> None:
    # A redis-server of the test's own: the policy is server-wide, and a worker of a test running
    # beside this one on the shared Redis refused to start while it was set there.
    with own_redis(tmp_path / "redis", ["--maxmemory-policy", "allkeys-lru"]) as server:
        with own_queue(pg_url, tmp_path, s3_endpoint, broker_url=server.url) as p:
            worker = p.start_worker("evicting")
            assert worker.wait(timeout=180) != 0
            log_text = p.log_text("evicting")
            refused = "cannot start the worker" in log_text and "allkeys-lru" in log_text
            assert refused, log_text[-2000:]
            p.redis().config_set("maxmemory-policy", "noeviction")
            # This server keeps nothing on disk: a warning, no refusal.
            p.start_worker("persistless")
            wait_until(
                lambda: "persist" in p.log_text("persistless"), 120, "the persistence warning"
            )
            assert p.workers[-1].poll() is None
