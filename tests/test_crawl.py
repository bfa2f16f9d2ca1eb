"""Crawls (`capworks enqueue`) against the real Redis and both databases: names the database
cannot store are recorded and skipped, the broker's settings are checked, a lost queue is
rebuilt from SQL, one run of a crawl at a time, and what the README promises of the filters."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import png_bytes, require_service, s3_client
from pipeline_support import (
    REDIS_URL,
    Pipeline,
    make_bucket,
    own_queue,
    query,
    queued_images,
    wait_until,
)
from redis_server import own_redis
from sqlalchemy import event, select, update

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.crawl import run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.sources import local_ref
from capworks.schema.broker_check import check_broker
from capworks.schema.checkpoint import CheckpointConfig, resolve_checkpoint
from capworks.schema.db import connect
from capworks.schema.errors import Code, ImageError
from capworks.schema.settings import Settings
from capworks.schema.tables import BadMessage, Crawl
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Caption as EngineCaption
from capworks.workers.engine import CaptionedImage
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

IDENTITY = ("m", "r", "h")


@pytest.fixture()
def local(any_db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    """A fresh database on each backend, for crawls run in this process."""
    with own_queue(any_db_url, tmp_path) as p:
        yield p


@pytest.fixture()
def cli(any_db_url: str, tmp_path: Path, shapes_dir: Path) -> Iterator[Pipeline]:
    """A fresh database on each backend, for `capworks enqueue --model shapes` runs."""
    with own_queue(any_db_url, tmp_path) as p:
        yield p


@pytest.fixture()
def cli_sqlite(tmp_path: Path, shapes_dir: Path) -> Iterator[Pipeline]:
    """`capworks enqueue` runs where the database does not matter."""
    with own_queue(f"sqlite:///{tmp_path / 'capworks.db'}", tmp_path) as p:
        yield p


def crawl(p: Pipeline, source: str, **options: Any) -> Any:
    """Run one crawl in this process, publishing to the test's queue."""
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    return run_crawl(
        source,
        crawl_id=options.pop("crawl_id", "c1"),
        db=connect(p.db_url),
        publisher=make_publisher(settings),
        s3_client=None,
        identity=IDENTITY,
        **options,
    )


def queued_jobs(p: Pipeline) -> list[dict[str, Any]]:
    """The job bodies in the queue, read from Redis without consuming them."""
    raw = p.redis().lrange(p.queue, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]


def queued_entries(p: Pipeline) -> dict[str, tuple[str | None, int | None]]:
    """URI -> (ETag, size) of every image in the queue."""
    return {uri: (etag, size) for job in queued_jobs(p) for uri, etag, size, _ in job["images"]}


def bad_messages(db_url: str) -> list[tuple[str, str]]:
    stmt = select(BadMessage.reason, BadMessage.body).order_by(BadMessage.body)
    return query(db_url, lambda conn: [tuple(row) for row in conn.execute(stmt).all()])  # type: ignore[no-any-return]


def image_folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:03d}.png").write_bytes(f"image {i}".encode())
    return folder


def captioned(text: str) -> CaptionedImage:
    return CaptionedImage(EngineCaption(text, -0.5, (), (1, 2), ()), 64, 64)


def shapes_writer(db_url: str, shapes_dir: Path) -> ResultWriter:
    """A writer of captions by the model `capworks enqueue --model shapes` checks against."""
    return ResultWriter(connect(db_url), resolve_checkpoint("shapes", None, shapes_dir.parent))


def test_file_names_that_are_not_utf8_are_recorded_and_the_rest_of_the_folder_is_enqueued(
    local: Pipeline, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in (b"a.png", b"caf\xe9.png", b"z.png", b"\xff.png"):  # the last one sorts last
        with open(os.fsencode(folder) + b"/" + name, "wb") as f:
            f.write(b"not looked at by the producer")
    stats = crawl(local, str(folder))
    good = [str(folder.resolve() / "a.png"), str(folder.resolve() / "z.png")]
    assert sorted(queued_images(local)) == good
    assert (stats.listed, stats.skipped, stats.enqueued) == (4, 2, 2)
    root = str(folder.resolve())
    expected = [
        ("file name is not valid UTF-8", f"{root}/\\xff.png"),
        ("file name is not valid UTF-8", f"{root}/caf\\xe9.png"),
    ]
    assert bad_messages(local.db_url) == expected
    # Run again (the crawl finished, so it lists anew): nothing more queued for them, no new rows.
    again = crawl(local, str(folder))
    assert (again.listed, again.skipped) == (4, 2)
    assert bad_messages(local.db_url) == expected


def test_uri_list_lines_the_database_cannot_hold_are_recorded_and_skipped(
    local: Pipeline, tmp_path: Path
) -> None:
    long_uri = "s3://b/" + "k" * 2100
    listing = tmp_path / "uris.txt"
    listing.write_bytes(
        b"s3://b/first.jpg\ns3://b/caf\xe9.jpg\n"
        + long_uri.encode()
        + b"\ns3://b/nul\x00.jpg\ns3://b/last.jpg\n"
    )
    stats = crawl(local, f"@{listing}")
    assert queued_images(local) == ["s3://b/first.jpg", "s3://b/last.jpg"]
    assert (stats.listed, stats.skipped, stats.enqueued) == (5, 3, 2)
    reasons = {reason for reason, _ in bad_messages(local.db_url)}
    assert reasons == {
        "URI is not valid UTF-8",
        f"URI is {len(long_uri)} characters; the database holds at most 2048",
        "URI contains a NUL character",
    }
    bodies = {body for _, body in bad_messages(local.db_url)}
    assert "s3://b/caf\\xe9.jpg" in bodies and long_uri in bodies


def test_uri_list_lines_that_are_not_uris_are_recorded_and_skipped(
    local: Pipeline, tmp_path: Path
) -> None:
    # A table handed over as a URI list: its header and rows are no URIs (issue 23, item 12).
    listing = tmp_path / "table.csv"
    listing.write_text(
        "url,caption\n"
        "https://img.example/dog.jpg,a dog\n"
        "photos/cat.jpg\n"
        "s3://b/a cat.jpg\n"
        "https://img.example/ok.jpg\n"
        "/srv/photos/ok.png\n"
        "s3://\n"
    )
    stats = crawl(local, f"@{listing}")
    assert sorted(queued_images(local)) == [
        "/srv/photos/ok.png",
        "https://img.example/ok.jpg",
        "s3://b/a cat.jpg",
    ]
    assert (stats.listed, stats.skipped, stats.enqueued) == (7, 4, 3)
    recorded = dict((body, reason) for reason, body in bad_messages(local.db_url))
    assert set(recorded) == {
        "url,caption",
        "https://img.example/dog.jpg,a dog",
        "photos/cat.jpg",
        "s3://",
    }
    assert all(reason.startswith("not an image URI") for reason in recorded.values())


def test_a_recrawl_skips_images_dead_lettered_for_their_own_fault_unless_asked_to_retry(
    local: Pipeline, tmp_path: Path
) -> None:
    config = CheckpointConfig(model_dir=tmp_path, model_id="m", revision="r")
    uris = [f"s3://b/{name}.jpg" for name in ("broken", "unreachable", "fine", "new")]
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(uris) + "\n")
    ResultWriter(connect(local.db_url), config).save(
        [
            Outcome(ImageRef(uris[0]), ImageError(Code.UNDECODABLE, "cannot identify image")),
            Outcome(ImageRef(uris[1]), ImageError(Code.STORAGE_UNAVAILABLE, "gave up")),
            Outcome(ImageRef(uris[2]), captioned("a red square")),
        ]
    )
    settings = Settings(broker_url=REDIS_URL, queue_name=local.queue)

    def recrawl(crawl_id: str, **options: Any) -> list[str]:
        local.redis().delete(local.queue)
        run_crawl(
            f"@{listing}",
            crawl_id=crawl_id,
            db=connect(local.db_url),
            publisher=make_publisher(settings),
            s3_client=None,
            identity=config.identity,
            **options,
        )
        return sorted(queued_images(local))

    # The undecodable image would fail again; the one that failed for another cause (storage,
    # perhaps fixed since) and the new one are sent.
    assert recrawl("c1") == [uris[3], uris[1]]
    assert recrawl("c2", retry_failed=True) == [uris[0], uris[3], uris[1]]


def test_a_pages_done_check_is_one_statement_with_its_uris_as_one_parameter_on_postgresql(
    local: Pipeline, tmp_path: Path
) -> None:
    config = CheckpointConfig(model_dir=tmp_path, model_id="m", revision="r")
    uris = [f"s3://b/{n:03d}.jpg" for n in range(250)]
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(uris) + "\n")
    ResultWriter(connect(local.db_url), config).save(
        [Outcome(ImageRef(uris[7]), captioned("a red square"))]
        + [Outcome(ImageRef(uris[140]), ImageError(Code.UNDECODABLE, "cannot identify image"))]
    )
    db = connect(local.db_url)
    checks: list[Any] = []

    @event.listens_for(db, "before_cursor_execute")
    def seen(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM images" in statement and ("captions" in statement or "failures" in statement):
            checks.append(params)

    run_crawl(
        f"@{listing}",
        crawl_id="c1",
        db=db,
        publisher=make_publisher(Settings(broker_url=REDIS_URL, queue_name=local.queue)),
        s3_client=None,
        identity=config.identity,
        page_size=100,
    )

    assert sorted(queued_images(local)) == [u for u in uris if u not in (uris[7], uris[140])]
    assert len(checks) == 3  # one statement a page of 100, 100 and 50 URIs
    if db.dialect.name == "postgresql":  # the URIs as one array, not one parameter each
        assert all(len(params) < 20 for params in checks), [len(p) for p in checks]


class LengthReads:
    """A Redis client that counts the queue-length reads made through it."""

    def __init__(self, client: Any) -> None:
        self.client, self.reads = client, 0

    def llen(self, name: str) -> int:
        self.reads += 1
        return int(self.client.llen(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize(("max_queued", "reads"), [(100_000, 1), (99, 1 + 10)])
def test_a_page_that_fits_the_queue_reads_its_length_once_else_before_each_job(
    local: Pipeline, tmp_path: Path, max_queued: int, reads: int
) -> None:
    """A round trip less a job for a producer far from Redis: 10 jobs of 10 images, one page;
    when the page does not fit, the page's read, then one before each job as before."""
    uris = [f"s3://b/{n:03d}.jpg" for n in range(100)]
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(uris) + "\n")
    settings = Settings(broker_url=REDIS_URL, queue_name=local.queue, job_images=10)
    publisher = make_publisher(settings)
    counted = LengthReads(publisher.redis)
    publisher.redis = counted
    run_crawl(
        f"@{listing}",
        crawl_id="c1",
        db=connect(local.db_url),
        publisher=publisher,
        s3_client=None,
        identity=IDENTITY,
        job_images=10,
        max_queued_images=max_queued,
    )
    assert sorted(queued_images(local)) == uris
    assert counted.reads == reads


# -- the broker ------------------------------------------------------------------------------


def test_an_evicting_broker_is_refused_in_one_line_unless_a_setting_allows_it(
    tmp_path: Path, shapes_dir: Path
) -> None:
    folder = image_folder(tmp_path, 3)
    # A redis-server of the test's own: the policy is server-wide, and a worker of a test running
    # beside this one on the shared Redis refused to start while it was set there.
    with own_redis(tmp_path / "redis", ["--maxmemory-policy", "allkeys-lru"]) as server:
        db = f"sqlite:///{tmp_path / 'capworks.db'}"
        with own_queue(db, tmp_path, broker_url=server.url) as p:
            refused = p.cli("enqueue", str(folder), "--no-progress")
            queued_when_refused = queued_images(p)
            p.extra_env["CAPWORKS_ALLOW_EVICTING_BROKER"] = "1"
            allowed = p.cli("enqueue", str(folder), "--no-progress")
            queued_when_allowed = queued_images(p)
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("capworks: error: ") and "maxmemory-policy allkeys-lru" in line
    assert queued_when_refused == []
    assert allowed.returncode == 0, allowed.stderr
    assert len(queued_when_allowed) == 3


def test_a_broker_without_persistence_is_warned_about_once(
    cli_sqlite: Pipeline, tmp_path: Path
) -> None:
    p = cli_sqlite
    r = p.redis()
    if r.config_get("appendonly")["appendonly"] != "no" or r.config_get("save")["save"]:
        pytest.skip("this Redis persists its data")
    first, second = image_folder(tmp_path / "a", 2), image_folder(tmp_path / "b", 2)
    result = p.cli("enqueue", str(first), str(second), "--no-progress")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "persistence" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], result.stderr
    assert len(queued_images(p)) == 4


def test_a_broker_that_refuses_config_gives_one_warning_not_a_failure() -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        admin.ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    user = f"capworks-test-{uuid.uuid4().hex[:8]}"
    # A managed Redis: every command but CONFIG.
    admin.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", "-config"]
    )
    try:
        client = redis.Redis.from_url(REDIS_URL, username=user, password="any")
        warnings = check_broker(client, allow_evicting=False)
    finally:
        admin.acl_deluser(user)
    assert len(warnings) == 1 and "CONFIG" in warnings[0], warnings


# -- a lost queue ----------------------------------------------------------------------------


def test_reconcile_enqueues_from_sql_alone_what_is_neither_captioned_nor_failed(
    cli: Pipeline, tmp_path: Path, shapes_dir: Path
) -> None:
    p = cli
    folder = image_folder(tmp_path, 6)
    first = p.cli("enqueue", str(folder), "--no-progress")
    assert first.returncode == 0, first.stderr
    first_ids = {job["id"] for job in queued_jobs(p)}
    refs = [local_ref(path) for path in sorted(folder.iterdir())]
    shapes_writer(p.db_url, shapes_dir).save(
        [
            Outcome(refs[0], captioned("a red square on a blue background")),
            Outcome(refs[1], captioned("a blue square on a red background")),
            Outcome(refs[2], ImageError(Code.TRUNCATED, "image file is truncated")),
        ]
    )
    # Redis restarts without persistence: the queue is gone. The crawl had listed everything
    # but was killed before it was marked done, so running it again resumes after the end.
    p.redis().delete(p.queue)
    query(
        p.db_url, lambda conn: (conn.execute(update(Crawl).values(state="running")), conn.commit())
    )
    resumed = p.cli("enqueue", str(folder), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert queued_images(p) == []
    reconciled = p.cli("enqueue", str(folder), "--reconcile", "--no-progress")
    assert reconciled.returncode == 0, reconciled.stderr
    assert sorted(queued_images(p)) == [ref.uri for ref in refs[3:]]
    assert not first_ids & {job["id"] for job in queued_jobs(p)}  # fresh job ids


# -- one run of a crawl at a time ------------------------------------------------------------


def test_a_second_run_of_a_crawl_is_refused_in_one_line_and_one_with_wait_takes_over(
    cli: Pipeline, tmp_path: Path
) -> None:
    p = cli
    folder = image_folder(tmp_path, 5)
    exe = str(Path(sys.executable).parent / "capworks")
    args = [exe, "enqueue", str(folder), "--crawl-id", "nightly", "--no-progress"]
    # No worker runs, so backpressure holds the first run after two one-image jobs.
    p.extra_env.update(CAPWORKS_JOB_IMAGES="1", CAPWORKS_MAX_QUEUED_IMAGES="1")
    slow = subprocess.Popen(args, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(queued_images(p)) >= 2, 120, "the first run to fill the queue")
        second = p.cli(*args[1:])
        assert second.returncode == 1, second.stderr
        [line] = [line for line in second.stderr.splitlines() if "error" in line]
        assert "crawl nightly" in line and "another" in line, second.stderr
        p.extra_env["CAPWORKS_MAX_QUEUED_IMAGES"] = "1000"
        waiting = subprocess.Popen(
            [*args, "--wait"], env=p.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        killer = threading.Timer(120, waiting.kill)  # a run that never says it waits fails
        killer.start()
        assert waiting.stderr is not None
        while "waiting" not in (line := waiting.stderr.readline()) and line:
            pass
        killer.cancel()
        assert "waiting" in line and waiting.poll() is None
        assert len(queued_images(p)) == 2
    finally:
        slow.send_signal(signal.SIGKILL)  # a killed run leaves the crawl to the next
        slow.wait()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert sorted(queued_images(p)) == sorted(str(f.resolve()) for f in folder.iterdir())


# -- the README's promises, on a real S3 server ----------------------------------------------


def enqueue(p: Pipeline, *args: str) -> dict[str, tuple[str | None, int | None]]:
    """`capworks enqueue s3://... ARGS` into an emptied queue; what it queued."""
    p.redis().delete(p.queue)
    result = p.cli("enqueue", *args, "--no-progress")
    assert result.returncode == 0, result.stderr
    return queued_entries(p)


def listed_as_uploaded(queued: dict[str, Any], bodies: dict[str, bytes]) -> None:
    """Every queued object carries its body's MD5 as ETag and its length as size."""
    for uri, (etag, size) in queued.items():
        assert (etag, size) == (
            hashlib.md5(bodies[uri], usedforsecurity=False).hexdigest(),
            len(bodies[uri]),
        ), uri


@pytest.mark.slow
def test_the_filters_of_enqueue_pick_what_the_readme_says(pipeline: Pipeline) -> None:
    p = pipeline
    bodies = dict(make_bucket(p.s3_endpoint, "filters", 6, seed=51).blobs)
    s3 = s3_client(p.s3_endpoint)
    extras = {
        "extra/tiny.png": b"x" * 10,
        "extra/huge.png": b"\0" * 300_000,
        "extra/photo.JPG": png_bytes(sample_scenes(1, 52)[0][0]),
    }
    for key, body in extras.items():
        s3.put_object(Bucket="filters", Key=key, Body=body)  # type: ignore[attr-defined]
        bodies[f"s3://filters/{key}"] = body
    listing = s3.list_objects_v2(Bucket="filters")["Contents"]  # type: ignore[attr-defined]
    since = max(obj["LastModified"] for obj in listing) + timedelta(seconds=1)
    late = png_bytes(sample_scenes(1, 53)[0][0])

    def upload_late() -> bool:
        s3.put_object(Bucket="filters", Key="late/new.png", Body=late)  # type: ignore[attr-defined]
        head = s3.head_object(Bucket="filters", Key="late/new.png")  # type: ignore[attr-defined]
        return bool(head["LastModified"] >= since)

    # S3 times are whole seconds: uploaded again until the server stamps it at `since` or later.
    wait_until(upload_late, 10, "an upload stamped at or after `since`")
    bodies["s3://filters/late/new.png"] = late

    everything = enqueue(p, "s3://filters/")
    assert set(everything) == set(bodies)
    listed_as_uploaded(everything, bodies)
    assert set(enqueue(p, "s3://filters/", "--suffix", ".jpg")) == {"s3://filters/extra/photo.JPG"}
    images = [uri for uri in bodies if "/extra/tiny" not in uri and "/extra/huge" not in uri]
    low, high = min(len(bodies[u]) for u in images), max(len(bodies[u]) for u in images)
    sized = enqueue(p, "s3://filters/", "--min-bytes", str(low), "--max-bytes", str(high))
    assert set(sized) == set(images)
    assert set(enqueue(p, "s3://filters/", "--min-bytes", "100000")) == {
        "s3://filters/extra/huge.png"
    }
    recent = enqueue(p, "s3://filters/", "--modified-since", since.isoformat())
    assert set(recent) == {"s3://filters/late/new.png"}
    listed_as_uploaded(recent, bodies)


@pytest.mark.slow
def test_enqueue_skips_captioned_objects_unless_forced_or_overwritten(
    pipeline: Pipeline, shapes_dir: Path
) -> None:
    p = pipeline
    bodies = dict(make_bucket(p.s3_endpoint, "captioned", 5, seed=54).blobs)
    first = enqueue(p, "s3://captioned/")
    assert set(first) == set(bodies)
    listed_as_uploaded(first, bodies)
    done = sorted(bodies)[:3]
    shapes_writer(p.db_url, shapes_dir).save(
        [
            Outcome(ImageRef(uri, etag=first[uri][0], size_bytes=first[uri][1]), captioned("x"))
            for uri in done
        ]
    )
    assert set(enqueue(p, "s3://captioned/")) == set(bodies) - set(done)
    forced = enqueue(p, "s3://captioned/", "--force")
    assert set(forced) == set(bodies)
    listed_as_uploaded(forced, bodies)
    # Overwriting a captioned object changes its ETag: it is captioned again.
    changed = done[0]
    bodies[changed] = png_bytes(sample_scenes(1, 55)[0][0])
    key = changed.removeprefix("s3://captioned/")
    s3_client(p.s3_endpoint).put_object(Bucket="captioned", Key=key, Body=bodies[changed])  # type: ignore[attr-defined]
    again = enqueue(p, "s3://captioned/")
    assert set(again) == (set(bodies) - set(done)) | {changed}
    listed_as_uploaded(again, bodies)
