"""A metrics endpoint cannot be held by clients that connect and say nothing: each connection has
an idle deadline and the handlers are capped. Real sockets on loopback, the real server."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from capworks.schema.metrics_endpoint import start_metrics_server

SILENT_CLIENTS = 50
MAX_HANDLERS = 16  # what the endpoint promises to hold at most
IDLE_DEADLINE_S = 10.0  # ... and for how long a silent connection


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("Thread-"))


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `within_s`."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass  # a 503 or 408 before the close is fine
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_fifty_silent_half_requests_hold_at_most_the_cap_and_are_cut_off() -> None:
    registry = CollectorRegistry()
    Counter("capworks_test_scrapes", "read back", registry=registry).inc()
    server, thread = start_metrics_server("127.0.0.1", 0, registry, None)
    port = server.server_port
    before = handler_threads()
    clients = []
    try:
        for _ in range(SILENT_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            clients.append(sock)
        time.sleep(1.0)
        held = handler_threads() - before
        assert held <= MAX_HANDLERS, f"{held} handler threads for {SILENT_CLIENTS} silent clients"
        started = time.monotonic()
        assert all(closed_by_server(s, IDLE_DEADLINE_S + 2.0) for s in clients)
        assert time.monotonic() - started <= IDLE_DEADLINE_S + 2.0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200 and b"capworks_test_scrapes_total 1.0" in reply.read()
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_connection_over_the_cap_is_answered_503_and_closed_and_the_slots_come_back() -> None:
    registry = CollectorRegistry()
    Counter("capworks_test_scrapes", "read back", registry=registry).inc()
    server, thread = start_metrics_server("127.0.0.1", 0, registry, None)
    port = server.server_port
    clients = [
        socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_HANDLERS)
    ]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        for sock in clients:
            sock.close()
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as ok:
            assert ok.status == 200 and b"capworks_test_scrapes_total 1.0" in ok.read()
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
