"""Prometheus metrics over HTTP, behind a bearer token when one is set: each worker process's
endpoint and `capworks status --serve-metrics` both start theirs here.

With `CAPWORKS_METRICS_TOKEN` set, every request must carry `Authorization: Bearer <token>`
(compared in constant time) or gets 401. Without one, an endpoint may listen on loopback only:
`bind_refusal` (a pure function) refuses any other address at start, unless the operator opts in
with `CAPWORKS_METRICS_ALLOW_OPEN=1` (a network where nothing else can reach the port).

A connection has `IDLE_DEADLINE_S` to send its whole request, and at most `MAX_CONNECTIONS` are
handled at once (`schema/http_limits.py`): 50 silent half-requests held 50 threads and file
descriptors of a worker process for as long as their clients liked.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector
from pydantic import SecretStr

from capworks.schema.http_limits import CappedThreadingMixIn, deadline_rfile

log = logging.getLogger(__name__)
REALM = 'Bearer realm="capworks metrics"'
IDLE_DEADLINE_S = 10.0  # for a connection to send its request: a scrape sends it at once
MAX_CONNECTIONS = 16  # handled at once; Prometheus holds one per target
WRITE_TIMEOUT_S = 10.0  # for the reply to leave

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class MetricsRefused(ValueError):
    """A metrics endpoint was asked to listen where it is not allowed to."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for any other name or address
    (`0.0.0.0`, `::` and "" listen on every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, token: SecretStr | None, allow_open: bool) -> str | None:
    """Why a metrics endpoint may not listen on `host`, or None when it may: loopback, a set
    token, or the operator's explicit `allow_open` lets it."""
    if is_loopback(host) or (token is not None and token.get_secret_value()) or allow_open:
        return None
    return (
        f"metrics on {host or 'every interface'} need CAPWORKS_METRICS_TOKEN (or "
        "CAPWORKS_METRICS_ALLOW_OPEN=1 to serve them to anyone who can reach the port)"
    )


def check_bind(host: str, token: SecretStr | None, allow_open: bool) -> None:
    """Raise `MetricsRefused` with `bind_refusal`'s reason when there is one."""
    reason = bind_refusal(host, token, allow_open)
    if reason is not None:
        raise MetricsRefused(reason)


def bearer_allows(authorization: str | None, token: str) -> bool:
    """True when an `Authorization` header value is `Bearer <token>` (scheme in any case)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def require_bearer(app: WsgiApp, token: SecretStr | None) -> WsgiApp:
    """`app` behind the bearer token; `app` itself when no token is set."""
    if token is None or not token.get_secret_value():
        return app

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if bearer_allows(environ.get("HTTP_AUTHORIZATION"), token.get_secret_value()):
            return app(environ, start_response)
        body = b"bad or missing bearer token\n"
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", REALM),
            ],
        )
        return [body]

    return guarded


class _Server(CappedThreadingMixIn, WSGIServer):
    allow_reuse_address = True
    max_connections = MAX_CONNECTIONS


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    deadline_at = 0.0  # monotonic seconds by which the request must have arrived

    def setup(self) -> None:
        super().setup()
        self.deadline_at = time.monotonic() + IDLE_DEADLINE_S
        self.rfile.close()
        self.rfile = deadline_rfile(self.connection, lambda: self.deadline_at)

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:
            log.debug("%s sent no whole request in %.0f s", self.address_string(), IDLE_DEADLINE_S)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.connection.settimeout(WRITE_TIMEOUT_S)  # the reads left it at what time was left
        return parsed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        # One line per scrape would drown the worker's log; debug level keeps it findable.
        log.debug("%s %s", self.address_string(), format % args)


def start_metrics_server(
    host: str, port: int, registry: Collector, token: SecretStr | None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` at http://host:port/metrics (`port` 0: any free one) on a daemon thread,
    behind `token` when set; `OSError` when the port cannot be bound."""
    server_class = _IPv6Server if ":" in host else _Server
    app = require_bearer(make_wsgi_app(registry), token)
    server = make_server(host, port, app, server_class, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
