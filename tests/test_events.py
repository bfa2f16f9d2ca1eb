"""`capworks events` against the real Redis, PostgreSQL, SeaweedFS, an SQS-compatible server
(moto's, started on 127.0.0.1) and real Celery workers with the shapes model."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from conftest import REPO, png_bytes, s3_client
from event_samples import eventbridge, records, s3_record, s3_test_event, sns_wrapped
from pipeline_support import (
    REDIS_URL,
    Pipeline,
    assert_mostly_true,
    captions,
    count_rows,
    failures,
    free_port,
    own_queue,
    query,
    queued_images,
    scrape,
    wait_until,
)
from sqlalchemy import select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.filer import FilerFollower, FilerPosition
from capworks.producer.events.sink import EventSink
from capworks.producer.events.sqs import SqsConsumer
from capworks.producer.events.webhook import (
    InsecureWebhook,
    WebhookAuth,
    WebhookServer,
    signed_headers,
)
from capworks.schema.checkpoint import resolve_identity
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings, get_settings
from capworks.schema.tables import BadMessage
from capworks.seaweed import SeaweedServer

pytestmark = pytest.mark.slow
WRAPPERS = Path(__file__).parent / "wrappers"
TOKEN = "s3cret-token-4e9d1a"  # 16 characters at least: shorter ones are refused at start-up
IDENTITY = ("shapes-test", "", "settings-hash")
AWKWARD = ["red flower.jpg", "a+b.png", "100%.jpeg", "ünïcödé/猫.png", "mixed + ü %2B.webp"]


def make_sink(p: Pipeline, identity: tuple[str, str, str] = IDENTITY) -> EventSink:
    """The sink `capworks events` builds, on the test's own queue and database (jobs carry
    `identity`: a worker serving another model would dead-letter them)."""
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    broker = redis.Redis.from_url(REDIS_URL)
    sender = BulkSender(make_celery(settings), broker, p.queue)
    return EventSink(sender.send, broker, identity, connect(p.db_url))


@contextmanager
def webhook(sink: EventSink, auth: WebhookAuth, **kwargs: Any) -> Iterator[WebhookServer]:
    server = WebhookServer("127.0.0.1", 0, sink, auth, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def bad_rows(db_url: str) -> list[tuple[str, str]]:
    stmt = select(BadMessage.job_key, BadMessage.reason)
    return query(db_url, lambda conn: [tuple(r) for r in conn.execute(stmt).all()])  # type: ignore[no-any-return]


def healthy(server: WebhookServer) -> bool:
    with urllib.request.urlopen(server.url.replace("/events", "/healthz"), timeout=10) as r:
        return bool(r.status == 200)


@pytest.fixture()
def queue_only(pg_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    """A queue and a migrated database of this test's own, no worker."""
    connect(pg_url).dispose()
    with own_queue(pg_url, tmp_path) as p:
        yield p


def upload(endpoint: str, bucket: str, keys: list[str], seed: int) -> dict[str, tuple[str, str]]:
    """Put shapes images under `keys`; each URI's (true caption, ETag)."""
    s3 = s3_client(endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        pass  # made by an earlier call
    out = {}
    for key, (img, caption) in zip(keys, sample_scenes(len(keys), seed), strict=True):
        reply = s3.put_object(Bucket=bucket, Key=key, Body=png_bytes(img))
        out[f"s3://{bucket}/{key}"] = (caption, reply["ETag"].strip('"'))
    return out


# --- webhook ------------------------------------------------------------------------------------


def test_webhook_records_become_one_job_per_new_object_and_duplicates_none(
    queue_only: Pipeline,
) -> None:
    p = queue_only
    with webhook(make_sink(p), WebhookAuth(token=TOKEN)) as server:
        body = records(*(s3_record("photos", k, etag=f"e{i}") for i, k in enumerate(AWKWARD)))
        status, reply = post(server.url, body, bearer())
        assert status == 200 and reply["published"] == len(AWKWARD), reply
        again = post(server.url, body, bearer())  # the sender retried a delivery that worked
        dup_in_body = post(
            server.url,
            records(s3_record("photos", "x.png"), s3_record("photos", "x.png")),
            bearer(),
        )
    assert again == (200, {"published": 0, "duplicates": len(AWKWARD), "ignored": 0, "bad": 0})
    assert dup_in_body[1]["published"] == 1 and dup_in_body[1]["duplicates"] == 1
    queued = queued_images(p)
    assert sorted(queued) == sorted([f"s3://photos/{k}" for k in AWKWARD] + ["s3://photos/x.png"])


def test_webhook_answers_bad_requests_with_4xx_enqueues_nothing_and_keeps_serving(
    queue_only: Pipeline,
) -> None:
    p = queue_only
    good = records(s3_record("photos", "ok.png"))
    secret = "hmac-secret"
    with webhook(
        make_sink(p), WebhookAuth(token=TOKEN, hmac_secret=secret), max_body_bytes=4096
    ) as server:
        cases = [
            (good, {"Authorization": "Bearer wrong"}, 401),
            (good, {}, 401),
            (good, signed_headers("other", good), 401),
            (b"{not json", bearer(), 400),
            (b'{"hello": "world"}', bearer(), 400),
            (records({"eventName": "ObjectCreated:Put", "s3": {}}), bearer(), 400),
            (b'{"Records": [' + b" " * 5000 + b"]}", bearer(), 413),
        ]
        for body, headers, want in cases:
            status, reply = post(server.url, body, headers)
            assert status == want, (body[:60], reply)
            assert healthy(server)
            assert queued_images(p) == []
        assert post(server.url.replace("/events", "/other"), good, bearer())[0] == 404
        # Still serving: a signed request and a bearer request both publish.
        assert post(server.url, good, signed_headers(secret, good))[0] == 200
        assert post(server.url, records(s3_record("photos", "two.png")), bearer())[0] == 200
    assert sorted(queued_images(p)) == ["s3://photos/ok.png", "s3://photos/two.png"]
    # Authenticated malformed bodies are kept, one row each; unauthenticated ones are not.
    reasons = [reason for key, reason in bad_rows(p.db_url)]
    assert len(reasons) == 3 and "not JSON" in reasons[0], reasons


def test_webhook_will_not_start_without_credentials_except_insecure_on_loopback(
    queue_only: Pipeline,
) -> None:
    sink = make_sink(queue_only)
    with pytest.raises(InsecureWebhook, match="no webhook credentials"):
        WebhookServer("127.0.0.1", 0, sink, WebhookAuth())
    with pytest.raises(InsecureWebhook, match="loopback only"):
        WebhookServer("0.0.0.0", 0, sink, WebhookAuth(), insecure=True)
    with webhook(sink, WebhookAuth(), insecure=True) as server:
        assert post(server.url, records(s3_record("photos", "open.png")), {})[0] == 200
    result = queue_only.cli("events", "--source", "webhook", "--port", "0")
    assert result.returncode == 1 and "no webhook credentials" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_uploads_announced_to_the_webhook_command_are_captioned_once_by_a_real_worker(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    uploads = upload(
        p.s3_endpoint,
        "webhook-uploads",
        [f"{k.rsplit('.', 1)[0]}.png" for k in AWKWARD] + ["plain.png"],
        seed=7,
    )
    port = free_port()
    env = {**p.env, "CAPWORKS_EVENTS_TOKEN": TOKEN}
    exe = Path(sys.executable).parent / "capworks"
    log = (p.tmp / "events.log").open("wb")
    consumer = subprocess.Popen(
        [str(exe), "events", "--source", "webhook", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    try:
        url = f"http://127.0.0.1:{port}/events"
        wait_until(
            lambda: _answers(url), 60, "the webhook", lambda: (p.tmp / "events.log").read_text()
        )
        recs = [
            s3_record("webhook-uploads", uri.split("/", 3)[3], etag=etag)
            for uri, (_, etag) in uploads.items()
        ]
        deleted = s3_record("webhook-uploads", "plain.png", name="ObjectRemoved:Delete")
        missing = s3_record("webhook-uploads", "deleted before it was fetched.png")
        assert post(url, records(*recs, deleted, missing), bearer())[0] == 200
        assert post(url, records(recs[0], recs[1]), bearer())[1]["duplicates"] == 2  # redelivered
        assert post(url, s3_test_event("webhook-uploads"), bearer())[1]["ignored"] == 1
        assert post(url, b"{broken", bearer())[0] == 400
        p.start_worker()
        wait_until(
            lambda: (
                count_rows(p.db_url)["captions"] >= len(uploads)
                and count_rows(p.db_url)["failures"] >= 1
                and p.queue_length() == 0
            ),
            300,
            "captions of every upload",
            lambda: p.log_text()[-3000:],
        )
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0
    rows = count_rows(p.db_url)
    assert (rows["images"], rows["captions"]) == (len(uploads) + 1, len(uploads))
    assert failures(p.db_url) == {
        "s3://webhook-uploads/deleted before it was fetched.png": "not_found"
    }
    assert_mostly_true(captions(p.db_url), {uri: c for uri, (c, _) in uploads.items()}, floor=0.8)
    assert len(bad_rows(p.db_url)) == 1


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url.replace("/events", "/healthz"), timeout=2).close()
        return True
    except OSError:
        return False


# --- SQS (moto's server mode) -------------------------------------------------------------------


@pytest.fixture()
def sqs_endpoint(tmp_path: Path) -> Iterator[str]:
    """moto's SQS-compatible server on 127.0.0.1, for this test only."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("moto_server is missing: pip install 'moto[server]' (the dev extra has it)")
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        ["timeout", "600", exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _sqs_up(endpoint),
            60,
            "moto's server",
            lambda: (tmp_path / "moto.log").read_text(),
        )
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def sqs(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _sqs_up(endpoint: str) -> bool:
    try:
        sqs(endpoint).list_queues()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def messages_left(client: Any, url: str) -> int:
    attrs = client.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def test_sqs_messages_of_every_shape_become_jobs_and_are_deleted_after_publishing(
    queue_only: Pipeline, sqs_endpoint: str
) -> None:
    p = queue_only
    client = sqs(sqs_endpoint)
    url = client.create_queue(QueueName="uploads")["QueueUrl"]
    bodies = [
        records(s3_record("photos", "red flower.jpg"), s3_record("photos", "a+b.png")),
        s3_test_event("photos"),
        records(s3_record("photos", "red flower.jpg")),  # a duplicate delivery
        eventbridge("photos", "bridge + raw.png"),
        sns_wrapped(records(s3_record("photos", "ünï/sns.png"))),
        records(s3_record("photos", "gone.png", name="ObjectRemoved:Delete")),
        b"this is not an event",
    ]
    for body in bodies:
        client.send_message(QueueUrl=url, MessageBody=body.decode())
    consumer = SqsConsumer(client, url, make_sink(p), wait_s=1, visibility_timeout_s=30)
    while consumer.poll_once():
        pass
    assert sorted(queued_images(p)) == [
        "s3://photos/a+b.png",
        "s3://photos/bridge + raw.png",
        "s3://photos/red flower.jpg",
        "s3://photos/ünï/sns.png",
    ]
    assert messages_left(client, url) == 0
    c = consumer.counts
    assert (c.received, c.deleted, c.published, c.duplicates, c.bad) == (7, 7, 4, 1, 1)
    [(job_key, reason)] = bad_rows(p.db_url)
    assert job_key.startswith("events:sqs:") and "not JSON" in reason


def test_sqs_visibility_is_extended_while_a_slow_publish_runs(
    queue_only: Pipeline, sqs_endpoint: str
) -> None:
    p = queue_only
    client = sqs(sqs_endpoint)
    url = client.create_queue(QueueName="slow")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody=records(s3_record("photos", "slow.png")).decode())
    sink = make_sink(p)
    real_publish = sink.publish
    publishing, release = threading.Event(), threading.Event()

    def held_publish(events: Any) -> Any:
        publishing.set()
        assert release.wait(60)  # a broker that answers only once the test has looked
        return real_publish(events)

    sink.publish = held_publish  # type: ignore[method-assign]
    consumer = SqsConsumer(client, url, sink, wait_s=1, visibility_timeout_s=2)
    extended: list[float] = []
    extend = consumer.extend_visibility

    def counted_extend(messages: list[dict[str, Any]]) -> None:
        extend(messages)
        extended.append(time.monotonic())

    consumer.extend_visibility = counted_extend  # type: ignore[method-assign]
    other = SqsConsumer(client, url, make_sink(p), wait_s=0, visibility_timeout_s=2)
    thread = threading.Thread(target=consumer.poll_once)
    thread.start()
    try:
        assert publishing.wait(30)
        # A heartbeat every third of the 2 s timeout from after the receive: the fourth comes
        # past the visibility the message was received with.
        wait_until(lambda: len(extended) >= 4, 30, "four visibility extensions")
        assert other.poll_once() == 0  # still invisible: the heartbeat extended it
    finally:
        release.set()
        thread.join()
    assert queued_images(p) == ["s3://photos/slow.png"] and messages_left(client, url) == 0


def test_sqs_consumer_killed_between_publish_and_delete_loses_nothing_and_adds_no_row(
    pipeline: Pipeline, sqs_endpoint: str
) -> None:
    p = pipeline
    client = sqs(sqs_endpoint)
    url = client.create_queue(QueueName="crash")["QueueUrl"]
    uploads = upload(p.s3_endpoint, "crashing", ["one.png", "two words.png", "three+.png"], seed=11)
    for uri, (_, etag) in uploads.items():
        body = records(s3_record("crashing", uri.split("/", 3)[3], etag=etag))
        client.send_message(QueueUrl=url, MessageBody=body.decode())
    env = {
        **p.env,
        "CAPWORKS_EVENTS_SQS_ENDPOINT_URL": sqs_endpoint,
        "CAPWORKS_EVENTS_SQS_QUEUE_URL": url,
        "CAPWORKS_EVENTS_SQS_VISIBILITY_TIMEOUT_S": "2",
        "CAPWORKS_EVENTS_SQS_WAIT_S": "1",
        "CAPWORKS_EVENTS_SQS_REGION": "us-east-1",
    }
    crashed = subprocess.run(
        [sys.executable, str(WRAPPERS / "crash_before_sqs_delete.py"), "events", "--source", "sqs"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    published = queued_images(p)
    assert published and messages_left(client, url) == 3  # published, none deleted
    exe = Path(sys.executable).parent / "capworks"
    log = (p.tmp / "sqs.log").open("wb")
    consumer = subprocess.Popen(
        [str(exe), "events", "--source", "sqs"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: messages_left(client, url) == 0,
            90,
            "the redelivered messages deleted",
            lambda: (p.tmp / "sqs.log").read_text(),
        )
        assert sorted(queued_images(p)) == sorted(uploads)  # each published exactly once
        p.start_worker()
        wait_until(
            lambda: count_rows(p.db_url)["captions"] >= 3 and p.queue_length() == 0,
            300,
            "three captions",
            lambda: p.log_text()[-3000:],
        )
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=60)
    rows = count_rows(p.db_url)
    assert (rows["images"], rows["captions"]) == (3, 3)


# --- SeaweedFS filer metadata stream -------------------------------------------------------------


def test_filer_stream_uploads_are_captioned_unlisted_and_a_restart_misses_and_replays_none(
    own_s3_server: SeaweedServer, pg_url: str, tmp_path: Path, shapes_dir: Path
) -> None:
    connect(pg_url).dispose()
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    assert weed is not None
    with own_queue(pg_url, tmp_path, own_s3_server.endpoint) as p:
        model = p.env["CAPWORKS_MODEL"]
        sink = make_sink(p, resolve_identity(model, None, get_settings().checkpoint_dir))

        def follow() -> tuple[threading.Event, threading.Thread]:
            stop, ready = threading.Event(), threading.Event()
            position = FilerPosition(sink.db, own_s3_server.filer, "/buckets/")
            follower = FilerFollower(weed, own_s3_server.filer, sink, position)
            thread = threading.Thread(target=follower.run, args=(stop, ready))
            thread.start()
            assert ready.wait(30)
            return stop, thread

        stop, thread = follow()
        first = upload(p.s3_endpoint, "stream", ["a.png", "b c.png", "ü+.png"], seed=3)
        wait_until(lambda: len(queued_images(p)) == 3, 60, "three jobs from the stream")
        stop.set()
        thread.join()
        handed: list[str] = []  # every object the restarted follower hands the sink
        publish = sink.publish

        def noted_publish(events: Any) -> Any:
            handed.extend(f"s3://{e.bucket}/{e.key}" for e in events)
            return publish(events)

        sink.publish = noted_publish  # type: ignore[method-assign]
        second = upload(p.s3_endpoint, "stream", ["later 1.png", "later 2.png"], seed=4)
        s3_client(p.s3_endpoint).put_object(Bucket="stream", Key="notes.txt", Body=b"not an image")
        stop, thread = follow()
        try:
            wait_until(lambda: len(queued_images(p)) >= 5, 60, "the two uploaded while stopped")
            # The stream is read in order: once an upload made after the restart is queued,
            # a replay of what came before it would be queued too.
            marker = upload(p.s3_endpoint, "stream", ["marker.png"], seed=5)
            wait_until(lambda: set(marker) <= set(queued_images(p)), 60, "the marker's job")
            assert sorted(queued_images(p)) == sorted([*first, *second, *marker])
            # Replays none: not even one the sink's duplicate check would have absorbed.
            assert sorted(handed) == sorted([*second, *marker])
            p.start_worker()
            wait_until(
                lambda: count_rows(p.db_url)["captions"] >= 6 and p.queue_length() == 0,
                300,
                "six captions",
                lambda: p.log_text()[-3000:],
            )
        finally:
            stop.set()
            thread.join()
        rows = count_rows(p.db_url)
        assert (rows["images"], rows["captions"], rows["failures"]) == (6, 6, 0)
        uploads = {**first, **second, **marker}
        assert_mostly_true(captions(p.db_url), {u: c for u, (c, _) in uploads.items()}, floor=0.8)


# --- upload -> caption latency ------------------------------------------------------------------


def test_worker_observes_upload_to_caption_latency_of_each_event_image_and_none_of_crawled(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    started_s = math.floor(time.time())  # EventBridge times have whole seconds
    uploads = upload(p.s3_endpoint, "latency", ["one.png", "two words.png", "bridge.png"], seed=5)
    crawled = upload(p.s3_endpoint, "latency-crawl", ["c1.png", "c2.png"], seed=6)
    uploaded_at = datetime.now(UTC)
    keys = {uri.split("/", 3)[3]: etag for uri, (_, etag) in uploads.items()}
    recs = []
    for key in ("one.png", "two words.png"):
        rec = s3_record("latency", key, etag=keys[key])
        rec["eventTime"] = uploaded_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        recs.append(rec)
    bridge = json.loads(eventbridge("latency", "bridge.png", etag=keys["bridge.png"]))
    bridge["time"] = uploaded_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    sink = make_sink(p, resolve_identity("shapes", None, get_settings().checkpoint_dir))
    with webhook(sink, WebhookAuth(token=TOKEN)) as server:
        assert post(server.url, records(*recs), bearer())[1]["published"] == 2
        assert post(server.url, json.dumps(bridge).encode(), bearer())[1]["published"] == 1
    assert p.cli("enqueue", "s3://latency-crawl/", "--no-progress").returncode == 0
    metrics_port = free_port()
    p.start_worker(metrics_port=metrics_port)
    wait_until(
        lambda: count_rows(p.db_url)["captions"] >= 5 and p.queue_length() == 0,
        300,
        "five captions",
        lambda: p.log_text()[-3000:],
    )
    metrics = scrape(metrics_port)
    elapsed_s = time.time() - started_s
    captioned = ("capworks_images_total", frozenset({("outcome", "captioned"), ("code", "")}))
    assert metrics[captioned] == len(uploads) + len(crawled)  # the crawl's were captioned here
    count = metrics[("capworks_upload_to_caption_seconds_count", frozenset())]
    total_s = metrics[("capworks_upload_to_caption_seconds_sum", frozenset())]
    assert count == len(uploads)  # event images only
    assert 0 <= total_s <= count * elapsed_s, (total_s, elapsed_s)
