"""An HTTP endpoint for S3-style event notifications (AWS via a relay, MinIO, Ceph).

`POST /events` with a JSON body. Authentication is on unless the server was built insecure:
`Authorization: Bearer <token>` or `X-Capworks-Signature: sha256=<hex HMAC-SHA256 of the body>`
(either one, whichever secret is configured; compared in constant time). Replies:

- 200 `{"published", "duplicates", "ignored", "bad"}` only after the jobs are in the queue;
  records that could not be used are kept in `bad_messages` and counted in `bad`;
- 400 for a body that is not JSON or not an event notification, or whose every record is bad
  (kept in `bad_messages` too, when the request was authenticated); 401 bad or missing
  credentials; 404 another path; 408 a body not sent within the request timeout; 411 no
  Content-Length; 413 a body over the limit (not read);
- 503 when the broker failed or another delivery of the same object is being published: the
  sender should retry (nothing of it stays claimed, so the retry publishes it).

`GET /healthz` answers 200 without authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from producer.events.records import BadRecord, MalformedEvent, Parsed, parse_body
from producer.events.sink import EventSink, Outcome
from schema.metrics_endpoint import is_loopback

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Capworks-Signature"
EVENTS_PATH = "/events"
JOB_KEY = "events:webhook"


class InsecureWebhook(ValueError):
    """The webhook was asked to start with no credentials where that is not allowed."""


@dataclass(frozen=True)
class WebhookAuth:
    """The shared secrets a request may prove it knows (None: not configured)."""

    token: str | None = None
    hmac_secret: str | None = None

    @property
    def configured(self) -> bool:
        """True when at least one secret is set."""
        return bool(self.token or self.hmac_secret)

    def allows(self, authorization: str | None, signature: str | None, body: bytes) -> bool:
        """True when the bearer token or the body's HMAC signature matches."""
        if self.token and authorization and authorization.startswith("Bearer "):
            if hmac.compare_digest(authorization[7:].encode(), self.token.encode()):
                return True
        if self.hmac_secret and signature and signature.startswith("sha256="):
            want = hmac.new(self.hmac_secret.encode(), body, hashlib.sha256).hexdigest()
            return hmac.compare_digest(signature[7:].strip().lower().encode(), want.encode())
        return False


def sign(secret: str, body: bytes) -> str:
    """The `X-Capworks-Signature` value a sender puts on `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


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


class WebhookServer(ThreadingHTTPServer):
    """A threaded HTTP server handing notification bodies to an `EventSink`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        host: str,
        port: int,
        sink: EventSink,
        auth: WebhookAuth,
        max_body_bytes: int = 1024 * 1024,
        request_timeout_s: float = 10.0,
        insecure: bool = False,
    ) -> None:
        require_auth(auth, host, insecure)
        self.sink = sink
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
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
    """One request: limits, authentication, then the server's `handle_body`."""

    server: WebhookServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """Apply the request timeout to every read (a slow or stalled sender is cut off)."""
        self.timeout = self.server.request_timeout_s  # type: ignore[misc]
        super().setup()

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
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "a Content-Length is required"}, close=True)
            return
        if int(length) > self.server.max_body_bytes:
            limit = self.server.max_body_bytes
            self._send(413, {"error": f"body over {limit} bytes"}, close=True)
            return
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self._send(408, {"error": "body not received in time"}, close=True)
            return
        if len(body) < int(length):
            self._send(400, {"error": "body shorter than its Content-Length"}, close=True)
            return
        auth = self.server.auth
        if auth.configured and not auth.allows(
            self.headers.get("Authorization"), self.headers.get(SIGNATURE_HEADER), body
        ):
            self._send(401, {"error": "bad or missing credentials"})
            return
        try:
            status, reply = self.server.handle_body(body)
        except SQLAlchemyError as exc:  # bad_messages could not be written: the sender retries
            log.error("recording a bad event failed: %s", exc)
            status, reply = 503, {"error": "the database is unavailable"}
        self._send(status, reply)

    def _send(self, status: int, reply: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(reply).encode()
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        """Access lines go to our logger at debug level, not to stderr."""
        log.debug("%s %s", self.address_string(), format % args)
