"""One deadline for the whole http(s) fetch, held on the connection itself: a server that dribbles
its status line, its headers or its body, or stalls a TLS handshake, and a resolver that hangs,
each end the fetch within the deadline plus half a second with a transient error. Every server
listens on 127.0.0.1 and stops by itself."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from capworks.schema.errors import Code, Kind, StorageError
from capworks.workers.guard import IPAddress, IPNetwork
from capworks.workers.http_fetch import GuardedHttp

LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
DEADLINE_S = 2.0
SLACK_S = 0.5
DRIBBLE_EVERY_S = 0.3
SERVER_LIFE_S = 8.0  # well past the deadline: a fetch that outlives the deadline is seen
HEADERS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n"
    + (b"X-Padding: " + b"a" * 400 + b"\r\n") * 4
)


@contextmanager
def raw_server(serve: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 running `serve(conn, stop)` for each connection, on a thread
    that stops by itself after `SERVER_LIFE_S` or when the test ends; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    ends_at = time.monotonic() + SERVER_LIFE_S

    def accept() -> None:
        while not stop.is_set() and time.monotonic() < ends_at:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                serve(conn, stop)
            except OSError:
                pass  # the client gave up, as it should at its deadline

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def dribble(data: bytes, conn: socket.socket, stop: threading.Event) -> None:
    """Send `data` one byte every `DRIBBLE_EVERY_S`, until it is sent or the server stops."""
    ends_at = time.monotonic() + SERVER_LIFE_S
    for byte in data:
        if stop.wait(DRIBBLE_EVERY_S) or time.monotonic() > ends_at:
            return
        conn.sendall(bytes([byte]))


def read_request(conn: socket.socket) -> None:
    conn.settimeout(SERVER_LIFE_S)
    seen = b""
    while b"\r\n\r\n" not in seen:
        chunk = conn.recv(4096)
        if not chunk:
            return
        seen += chunk


def header_dribble(conn: socket.socket, stop: threading.Event) -> None:
    read_request(conn)
    dribble(HEADERS + b"\r\n" + b"x" * 1000, conn, stop)


def body_dribble(conn: socket.socket, stop: threading.Event) -> None:
    read_request(conn)
    conn.sendall(HEADERS + b"\r\n")
    dribble(b"x" * 1000, conn, stop)


def silent_tls(conn: socket.socket, stop: threading.Event) -> None:
    """Accept the connection, read the ClientHello, answer nothing."""
    conn.settimeout(0.1)
    ends_at = time.monotonic() + SERVER_LIFE_S
    while not stop.is_set() and time.monotonic() < ends_at:
        try:
            if not conn.recv(4096):
                return
        except TimeoutError:
            continue


def tls_hello_dribble(conn: socket.socket, stop: threading.Event) -> None:
    """A TLS handshake that never completes: a ServerHello record header sent a byte at a time."""
    conn.recv(4096)
    dribble(b"\x16\x03\x03\x40\x00" + b"\x02" * 0x4000, conn, stop)


def timed_fetch(uri: str, http: GuardedHttp | None = None) -> tuple[float, StorageError]:
    """How long a fetch of `uri` under the test deadline took, and the error it ended with."""
    http = http or GuardedHttp(10_000, DEADLINE_S, LOOPBACK)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as caught:
            http.get(uri)
    finally:
        took_s = time.monotonic() - started
        http.close()
    return took_s, caught.value


@pytest.mark.parametrize(
    ("serve", "scheme"),
    [
        (header_dribble, "http"),
        (body_dribble, "http"),
        (silent_tls, "https"),
        (tls_hello_dribble, "https"),
    ],
    ids=["header-dribble", "body-dribble", "silent-tls-handshake", "dribbled-tls-handshake"],
)
def test_a_dribbling_or_stalling_server_ends_the_fetch_by_its_deadline(
    serve: Callable[[socket.socket, threading.Event], None], scheme: str
) -> None:
    with raw_server(serve) as port:
        took_s, error = timed_fetch(f"{scheme}://127.0.0.1:{port}/image.png")
    print(f"{serve.__name__} over {scheme}: ended after {took_s:.2f} s: {error}")
    assert took_s < DEADLINE_S + SLACK_S, f"fetch held {took_s:.2f} s: {error}"
    assert error.code is Code.STORAGE_UNAVAILABLE and error.kind is Kind.TRANSIENT


def test_a_dribbled_status_line_reports_the_deadline() -> None:
    with raw_server(header_dribble) as port:
        _, error = timed_fetch(f"http://127.0.0.1:{port}/image.png")
    assert f"not fetched within {DEADLINE_S:g} s" in error.message


class FakeHangingResolver:
    """A resolver that takes far longer than the deadline (the system's cannot be made to hang
    on loopback), then answers loopback."""

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        time.sleep(SERVER_LIFE_S)
        return [ipaddress.ip_address("127.0.0.1")]


def test_a_name_that_takes_long_to_resolve_ends_the_fetch_by_its_deadline() -> None:
    http = GuardedHttp(10_000, DEADLINE_S, LOOPBACK, resolver=FakeHangingResolver())
    took_s, error = timed_fetch("http://images.example:9/a.png", http)
    assert took_s < DEADLINE_S + SLACK_S, f"fetch held {took_s:.2f} s: {error}"
    assert error.code is Code.STORAGE_UNAVAILABLE
    assert "resolve" in error.message


def test_a_kept_alive_connection_takes_the_next_fetchs_deadline() -> None:
    """A pooled connection carries no deadline of its own: the second fetch on it is cut at its
    own deadline, not the first one's (which has long passed)."""
    calls = 0

    def first_quick_then_dribble(conn: socket.socket, stop: threading.Event) -> None:
        nonlocal calls
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        calls += 1
        header_dribble(conn, stop)

    http = GuardedHttp(10_000, DEADLINE_S, LOOPBACK)
    with raw_server(first_quick_then_dribble) as port:
        uri = f"http://127.0.0.1:{port}/image.png"
        assert http.get(uri) == b"ok"
        time.sleep(DEADLINE_S + 0.2)  # the first fetch's deadline is gone
        took_s, error = timed_fetch(uri, http)
    assert calls == 1, "the second fetch did not reuse the kept-alive connection"
    assert DEADLINE_S - 0.1 < took_s < DEADLINE_S + SLACK_S, f"{took_s:.2f} s: {error}"
