"""An HTTP endpoint for S3-style event notifications (AWS via a relay, MinIO, Ceph).

`POST /events` with a JSON body and a `Content-Length`. Authentication is on unless the server
was built insecure, with either secret that is configured (compared in constant time):

- `Authorization: Bearer <token>`, checked before the body is read;
- `X-Capworks-Timestamp: <Unix seconds>` and `X-Capworks-Signature: sha256=<hex HMAC-SHA256 of
  "<timestamp>." followed by the body>` (`sign`, `signed_headers`). A timestamp more than
  `MAX_SIGNATURE_AGE_S` (5 minutes) away from the server's clock is refused before the body is
  read, so a captured request cannot be replayed later.

Each request has one deadline (`request_timeout_s`) for all its reads, headers included, and at
most `max_connections` are handled at once (`schema/http_limits.py`). Replies:

- 200 `{"published", "duplicates", "ignored", "bad"}` only after the jobs are in the queue;
  records that could not be used are kept in `bad_messages` and counted in `bad`;
- 400 for a body that is not JSON or not an event notification, or whose every record is bad
  (kept in `bad_messages` too, when the request was authenticated); 400 and the connection
  closed for `Transfer-Encoding`, two `Content-Length`s or one that is not ASCII digits (what
  lets a second request ride behind the first); 401 bad, missing or expired credentials;
  404 another path; 408 a request not received within its deadline; 411 no Content-Length;
  413 a body over `max_body_bytes` (not read) or of more than `max_records` records (none kept);
- 503 when the connections are all taken, the broker failed, or another delivery of the same
  object is being published: the sender should retry (nothing of it stays claimed).

`GET /healthz` answers 200 without authentication.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from capworks.producer.events.records import BadRecord, MalformedEvent, Parsed, parse_body
from capworks.producer.events.sink import EventSink, Outcome
from capworks.schema.http_limits import CappedThreadingMixIn, deadline_rfile, discard_arrived
from capworks.schema.metrics_endpoint import is_loopback

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Capworks-Signature"
TIMESTAMP_HEADER = "X-Capworks-Timestamp"
EVENTS_PATH = "/events"
JOB_KEY = "events:webhook"
MAX_SIGNATURE_AGE_S = 300
MAX_CONNECTIONS = 32
MAX_RECORDS = 1000  # 140,000 in one 850 KB body made as many bad_messages rows
WRITE_TIMEOUT_S = 5.0
_DIGITS = re.compile(r"[0-9]{1,18}", re.ASCII)
_FULL_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 33\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b'{"error": "too many connections"}'
)


class InsecureWebhook(ValueError):
    """The webhook was asked to start with no credentials where that is not allowed."""


class BadRequest(ValueError):
    """A request refused before its body is read: the status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Verdict(enum.Enum):
    """What a request's headers say about its credentials."""

    ALLOWED = "allowed"  # the bearer token matched, or the server is insecure
    CHECK_BODY = "check_body"  # a signature with a fresh timestamp: the body's HMAC decides
    REFUSED = "refused"


@dataclass(frozen=True)
class WebhookAuth:
    """The shared secrets a request may prove it knows (None: not configured)."""

    token: str | None = None
    hmac_secret: str | None = None

    @property
    def configured(self) -> bool:
        """True when at least one secret is set."""
        return bool(self.token or self.hmac_secret)

    def check_headers(
        self,
        authorization: str | None,
        signature: str | None,
        timestamp: str | None,
        now_s: float,
    ) -> tuple[Verdict, str]:
        """The verdict on a request's credentials before its body is read, and why."""
        if not self.configured:
            return Verdict.ALLOWED, "no credentials configured"
        if self.token and authorization and authorization.startswith("Bearer "):
            if hmac.compare_digest(authorization[7:].encode(), self.token.encode()):
                return Verdict.ALLOWED, "bearer token"
        if not (self.hmac_secret and signature):
            return Verdict.REFUSED, "bad or missing credentials"
        if timestamp is None or not _DIGITS.fullmatch(timestamp.strip()):
            return Verdict.REFUSED, f"a signature needs {TIMESTAMP_HEADER}: Unix seconds"
        if abs(now_s - int(timestamp)) > MAX_SIGNATURE_AGE_S:
            return Verdict.REFUSED, (
                f"the signature's timestamp is older than {MAX_SIGNATURE_AGE_S} s "
                "(or as far ahead): sign each delivery when it is sent"
            )
        return Verdict.CHECK_BODY, "signature"

    def signature_matches(self, signature: str, timestamp: str, body: bytes) -> bool:
        """True when `signature` is the HMAC of `timestamp` and `body` under the secret."""
        if not (self.hmac_secret and signature.startswith("sha256=")):
            return False
        want = sign(self.hmac_secret, body, int(timestamp))
        return hmac.compare_digest(signature.strip().lower().encode(), want.encode())


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Capworks-Signature` value of `body` sent at `timestamp` (Unix seconds)."""
    material = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), material, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, now_s: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers a sender puts on `body`."""
    timestamp = int(time.time() if now_s is None else now_s)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, body, timestamp)}


def content_length(headers: Message, max_body_bytes: int) -> int:
    """The body's length from the headers; `BadRequest` for framing that two servers could
    read two ways (`Transfer-Encoding`, two lengths, anything but ASCII digits), none, or over
    `max_body_bytes`."""
    if headers.get_all("Transfer-Encoding"):
        raise BadRequest(400, "Transfer-Encoding is not accepted: send a Content-Length")
    lengths = headers.get_all("Content-Length") or []
    if not lengths:
        raise BadRequest(411, "a Content-Length is required")
    if len(lengths) > 1:
        raise BadRequest(400, "more than one Content-Length")
    if not _DIGITS.fullmatch(lengths[0].strip()):
        raise BadRequest(400, "Content-Length is not a number in ASCII digits")
    length = int(lengths[0])
    if length > max_body_bytes:
        raise BadRequest(413, f"body over {max_body_bytes} bytes")
    return length


def require_auth(auth: WebhookAuth, host: str, insecure: bool) -> None:
    """Raise `InsecureWebhook` unless a secret is set, or `insecure` is asked on loopback."""
    if auth.configured:
        return
    if not insecure:
        raise InsecureWebhook(
            "no webhook credentials: set CAPWORKS_EVENTS_TOKEN or "
            "CAPWORKS_EVENTS_HMAC_SECRET (or give --insecure on a loopback address)"
        )
    if not is_loopback(host):
        raise InsecureWebhook(f"--insecure is allowed on loopback only, not on {host}")


class WebhookServer(CappedThreadingMixIn, HTTPServer):
    """A threaded HTTP server handing notification bodies to an `EventSink`."""

    allow_reuse_address = True
    request_queue_size = 128  # a burst of connects is accepted, then answered or refused
    full_reply = _FULL_REPLY

    def __init__(
        self,
        host: str,
        port: int,
        sink: EventSink,
        auth: WebhookAuth,
        max_body_bytes: int = 1024 * 1024,
        request_timeout_s: float = 10.0,
        insecure: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        max_records: int = MAX_RECORDS,
    ) -> None:
        require_auth(auth, host, insecure)
        self.sink = sink
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.max_records = max_records
        self.lock = threading.Lock()  # one publish at a time: the sink's Redis pipeline
        super().__init__((host, port), EventHandler)

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{EVENTS_PATH}"

    def handle_body(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Parse and publish one authenticated body; the status and the reply."""
        try:
            parsed = parse_body(body)
        except MalformedEvent as exc:
            bad = BadRecord(exc.message, body.decode("utf-8", "backslashreplace")[:10_000])
            self.sink.record_bad(JOB_KEY, [bad])
            return 400, {"error": exc.message}
        count = len(parsed.created) + parsed.ignored + len(parsed.bad)
        if count > self.max_records:
            return 413, {
                "error": f"{count:,} records in one body; at most {self.max_records:,}: "
                "send them in smaller bodies"
            }
        if parsed.bad:
            self.sink.record_bad(JOB_KEY, parsed.bad)
        if parsed.bad and not parsed.created and not parsed.ignored:
            return 400, {"error": "no usable record", "reasons": [b.reason for b in parsed.bad]}
        try:
            with self.lock:
                outcomes = self.sink.publish(parsed.created)
        except RedisError as exc:
            log.error("publishing failed: %s", exc)
            return 503, {"error": f"the queue is unavailable: {exc}"}
        return _reply(parsed, outcomes)


def _reply(parsed: Parsed, outcomes: list[Outcome]) -> tuple[int, dict[str, Any]]:
    counts = {o.value: outcomes.count(o) for o in Outcome}
    reply = {
        "published": counts["published"],
        "duplicates": counts["duplicate"],
        "ignored": parsed.ignored,
        "bad": len(parsed.bad),
    }
    if counts["in_flight"]:
        return 503, {**reply, "in_flight": counts["in_flight"], "error": "retry later"}
    return 200, reply


class EventHandler(BaseHTTPRequestHandler):
    """One connection: per request, limits, credentials, the body, then `handle_body`."""

    server: WebhookServer
    protocol_version = "HTTP/1.1"
    deadline_at = 0.0  # monotonic seconds by which the current request must have arrived

    def setup(self) -> None:
        """Every read of the connection keeps to the current request's deadline."""
        super().setup()
        self.rfile.close()
        self.rfile = deadline_rfile(self.connection, lambda: self.deadline_at)

    def handle_one_request(self) -> None:
        """One request within `request_timeout_s`, the wait for its first byte included."""
        self.deadline_at = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        """Health check."""
        if self.path == "/healthz":
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        """Receive one notification body."""
        if self.path.split("?", 1)[0] != EVENTS_PATH:
            self._send(404, {"error": f"POST event notifications to {EVENTS_PATH}"}, close=True)
            return
        try:
            length = content_length(self.headers, self.server.max_body_bytes)
        except BadRequest as exc:
            self._send(exc.status, {"error": exc.reason}, close=True)
            return
        signature = self.headers.get(SIGNATURE_HEADER) or ""
        timestamp = self.headers.get(TIMESTAMP_HEADER) or ""
        verdict, why = self.server.auth.check_headers(
            self.headers.get("Authorization"), signature, timestamp, time.time()
        )
        if verdict is Verdict.REFUSED:  # the body is never read: the connection ends
            self._send(401, {"error": why}, close=True)
            return
        body = self._read_body(length)
        if body is None:
            return
        if verdict is Verdict.CHECK_BODY and not self.server.auth.signature_matches(
            signature, timestamp, body
        ):
            self._send(401, {"error": "bad or missing credentials"})
            return
        try:
            status, reply = self.server.handle_body(body)
        except SQLAlchemyError as exc:  # bad_messages could not be written: the sender retries
            log.error("recording a bad event failed: %s", exc)
            status, reply = 503, {"error": "the database is unavailable"}
        self._send(status, reply)

    def _read_body(self, length: int) -> bytes | None:
        """The body, read as it arrives (memory grows with what was sent, not what was
        announced); None when an answer was already sent."""
        body = bytearray()
        try:
            while len(body) < length:
                chunk = self.rfile.read1(min(65536, length - len(body)))
                if not chunk:
                    break
                body += chunk
        except TimeoutError:
            self._send(408, {"error": "request not received in time"}, close=True)
            return None
        if len(body) < length:
            self._send(400, {"error": "body shorter than its Content-Length"}, close=True)
            return None
        return bytes(body)

    def _send(self, status: int, reply: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(reply).encode()
        self.connection.settimeout(WRITE_TIMEOUT_S)  # the reads left it at what time was left
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "1")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        if close:
            discard_arrived(self.connection)  # a body left unread would reset the reply away

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        """Access lines go to our logger at debug level, not to stderr."""
        log.debug("%s %s", self.address_string(), format % args)
