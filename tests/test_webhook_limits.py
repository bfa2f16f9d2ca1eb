"""The event webhook under hostile clients, on real loopback sockets with the real sink (Redis,
PostgreSQL): one deadline per request, credentials checked before the body where they can be,
a cap on connections, a bound on records, strict framing, and signatures that expire.

Raw sockets send what no HTTP library would (two Content-Lengths, `Transfer-Encoding` beside a
Content-Length, a superscript digit). The load test runs `capworks events --source webhook` as a
subprocess and reads its threads and memory from /proc.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REPO
from event_samples import records, s3_record
from pipeline_support import REDIS_URL, Pipeline, free_port, own_queue, queued_images, wait_until
from sqlalchemy import func, select

from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.sink import EventSink
from capworks.producer.events.webhook import WebhookAuth, WebhookServer
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import BadMessage

TOKEN = "webhook-token-5e1d7c"
SECRET = "webhook-hmac-secret-93b2"
IDENTITY = ("shapes-test", "", "settings-hash")
DEADLINE_S = 2.0


@pytest.fixture()
def queue_only(pg_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    connect(pg_url).dispose()
    with own_queue(pg_url, tmp_path) as p:
        yield p


@contextmanager
def webhook(p: Pipeline, **kwargs: Any) -> Iterator[WebhookServer]:
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    broker = redis.Redis.from_url(REDIS_URL)
    sink = EventSink(
        BulkSender(make_celery(settings), broker, p.queue).send, broker, IDENTITY, connect(p.db_url)
    )
    auth = WebhookAuth(token=TOKEN, hmac_secret=SECRET)
    server = WebhookServer("127.0.0.1", 0, sink, auth, request_timeout_s=DEADLINE_S, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def exchange(server: WebhookServer, raw: bytes, wait_s: float = 10.0) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it (or `wait_s`)."""
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), port), timeout=wait_s) as sock:
        sock.sendall(raw)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            got += b"<still open>"
        except ConnectionResetError:
            got += b"<reset>"
    return got


def request(body: bytes, *headers: str) -> bytes:
    head = ["POST /events HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def statuses(reply: bytes) -> list[int]:
    return [int(line.split()[1]) for line in reply.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def signature(body: bytes, timestamp: int, secret: str = SECRET) -> list[str]:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return [f"X-Capworks-Timestamp: {timestamp}", f"X-Capworks-Signature: sha256={mac}"]


GOOD = records(s3_record("photos", "ok.png"))
BEARER = f"Authorization: Bearer {TOKEN}"


def test_transfer_encoding_or_two_content_lengths_are_refused_with_400_and_closed(
    queue_only: Pipeline,
) -> None:
    smuggled = request(GOOD, BEARER)
    with webhook(queue_only) as server:
        te_and_cl = exchange(
            server,
            request(b"0\r\n\r\n", BEARER, "Transfer-Encoding: chunked", "Content-Length: 5")
            + smuggled,
        )
        two_lengths = exchange(
            server,
            request(GOOD, BEARER, f"Content-Length: {len(GOOD)}", f"Content-Length: {len(GOOD)}")
            + smuggled,
        )
        superscript = exchange(server, request(b"{}", BEARER, "Content-Length: \u00b2"))
        spaced_sign = exchange(server, request(GOOD, BEARER, f"Content-Length: +{len(GOOD)}"))
    for reply in (te_and_cl, two_lengths, superscript, spaced_sign):
        assert statuses(reply) == [400], reply[:300]  # one answer, then closed: nothing rides
        assert b"<still open>" not in reply
    assert queued_images(queue_only) == []


def test_a_request_without_credentials_is_refused_before_its_body_arrives(
    queue_only: Pipeline,
) -> None:
    with webhook(queue_only) as server:
        started = time.monotonic()
        reply = exchange(server, request(b"", "Content-Length: 100000"), wait_s=DEADLINE_S + 3)
        waited_s = time.monotonic() - started
        wrong = exchange(server, request(b"", "Authorization: Bearer nope", "Content-Length: 9"))
    assert statuses(reply) == [401] and waited_s < 1.0, (reply[:200], waited_s)
    assert statuses(wrong) == [401]


def test_a_signed_request_is_accepted_and_an_old_or_unstamped_one_refused(
    queue_only: Pipeline,
) -> None:
    length = f"Content-Length: {len(GOOD)}"
    now = int(time.time())
    with webhook(queue_only) as server:
        good = exchange(server, request(GOOD, length, "Connection: close", *signature(GOOD, now)))
        old = exchange(server, request(GOOD, length, *signature(GOOD, now - 301)))
        future = exchange(server, request(GOOD, length, *signature(GOOD, now + 301)))
        other_secret = exchange(server, request(GOOD, length, *signature(GOOD, now, "other")))
        mac = hmac.new(SECRET.encode(), GOOD, hashlib.sha256).hexdigest()  # the old scheme
        unstamped = exchange(server, request(GOOD, length, f"X-Capworks-Signature: sha256={mac}"))
    assert statuses(good) == [200], good
    for reply in (old, future, other_secret, unstamped):
        assert statuses(reply) == [401], reply[:300]
    assert b"older than" in old or b"timestamp" in old
    assert queued_images(queue_only) == ["s3://photos/ok.png"]


def test_a_body_of_more_records_than_the_limit_is_refused_whole_and_nothing_kept(
    queue_only: Pipeline,
) -> None:
    body = json.dumps({"Records": list(range(1001))}).encode()
    with webhook(queue_only) as server:
        reply = exchange(
            server, request(body, BEARER, f"Content-Length: {len(body)}", "Connection: close")
        )
    assert statuses(reply) == [413], reply[:300]
    assert b"1,001 records" in reply and b"1,000" in reply
    with connect(queue_only.db_url).connect() as conn:
        assert conn.scalar(select(func.count()).select_from(BadMessage)) == 0


def test_a_client_dribbling_its_headers_is_cut_off_at_the_deadline(queue_only: Pipeline) -> None:
    with webhook(queue_only) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((str(host), port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /events HTTP/1.1\r\n")
            cut_after_s = None
            for i in range(100):
                try:
                    sock.sendall(f"X-Pad-{i}: a\r\n".encode())
                    sock.settimeout(0.5)
                    if sock.recv(4096) == b"":
                        cut_after_s = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut_after_s = time.monotonic() - started
                    break
    print(f"header dribbler cut after {cut_after_s} s (deadline {DEADLINE_S} s)")
    assert cut_after_s is not None and cut_after_s <= DEADLINE_S + 0.5, cut_after_s


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def dribble(port: int, body_too: bool, cut_after_s: list[float]) -> None:
    """One unauthenticated client: its headers a line at a time, or a bogus signature and then
    its body a little at a time, until the server closes the connection (or 30 s); appends how
    long it was held after it connected."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    except OSError:
        cut_after_s.append(0.0)  # refused outright: not held at all
        return
    started = time.monotonic()
    try:
        with sock:
            if body_too:
                head = request(b"", "Content-Length: 1000000", *signature(b"x", int(time.time())))
                sock.sendall(head)
                piece = b"x" * 4096
            else:
                sock.sendall(b"POST /events HTTP/1.1\r\n")
                piece = b"X-Pad: a\r\n"
            sock.settimeout(0.2)
            while time.monotonic() - started < 30:
                sock.sendall(piece)
                try:
                    if not sock.recv(4096):  # a 503, 401 or 408 may come first: read on
                        break
                except TimeoutError:
                    continue
    except OSError:
        pass  # reset or refused: cut off
    cut_after_s.append(time.monotonic() - started)


@pytest.mark.slow
def test_four_hundred_dribbling_clients_hold_at_most_the_cap_and_64_mib(
    queue_only: Pipeline, shapes_dir: Path
) -> None:
    port = free_port()
    env = {
        **queue_only.env,
        "CAPWORKS_EVENTS_TOKEN": TOKEN,
        "CAPWORKS_EVENTS_HMAC_SECRET": SECRET,
        "CAPWORKS_EVENTS_REQUEST_TIMEOUT_S": str(DEADLINE_S),
    }
    log = (queue_only.tmp / "events.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "events", "--source", "webhook",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        wait_until(
            lambda: b"listening" in (queue_only.tmp / "events.log").read_bytes(),
            120,
            "the webhook",
            lambda: (queue_only.tmp / "events.log").read_text(errors="replace"),
        )
        time.sleep(0.5)
        before = proc_status(server.pid)
        cut_after_s: list[float] = []
        clients = [
            threading.Thread(target=dribble, args=(port, n % 2 == 0, cut_after_s), daemon=True)
            for n in range(400)
        ]
        started = time.monotonic()
        for client in clients:
            client.start()
        peak = dict(before)
        while any(c.is_alive() for c in clients) and time.monotonic() - started < 40:
            now = proc_status(server.pid)
            peak = {k: max(peak[k], now[k]) for k in peak}
            time.sleep(0.05)
        for client in clients:
            client.join(timeout=5)
        took_s = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    extra_threads = peak["Threads"] - before["Threads"]
    extra_rss_mib = (peak["VmRSS"] - before["VmRSS"]) / 1024
    print(
        f"400 dribblers: {extra_threads} extra threads, {extra_rss_mib:.1f} MiB, all done in "
        f"{took_s:.1f} s, each held at most {max(cut_after_s, default=0):.2f} s"
    )
    assert extra_threads <= 32, extra_threads  # the webhook's connection cap
    assert extra_rss_mib <= 64, extra_rss_mib
    # Each is held at most until its request's deadline (2 s), the slack for 400 threads on
    # two cores; those over the cap are refused at once.
    assert len(cut_after_s) == 400 and max(cut_after_s) <= DEADLINE_S + 2.0, max(cut_after_s)
    assert took_s < 20
