"""Limits every HTTP endpoint of capworks puts on its clients (the event webhook, the metrics
endpoints): one deadline for all the reads of a request, and a cap on the connections handled at
once. A client that dribbles its headers or body, or connects and says nothing, holds a thread
until its deadline at most; the connections over the cap are answered 503 and closed without a
thread of their own.

The deadline is on the socket itself: each `recv` gets the time left (`DeadlineReader`), so a
byte every few seconds no longer renews a per-read timeout for ever.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any

log = logging.getLogger(__name__)

PLAIN_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n"
)
REFUSE_WRITE_TIMEOUT_S = 1.0


class DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only the time left before `deadline_at()` (monotonic
    seconds); past it, `TimeoutError`."""

    def __init__(self, sock: socket.socket, deadline_at: Callable[[], float]) -> None:
        super().__init__()
        self._sock = sock
        self._deadline_at = deadline_at

    def readable(self) -> bool:
        """Always: this is the read side of a socket."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Receive into `buffer` within the time left."""
        left_s = self._deadline_at() - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(left_s)
        return self._sock.recv_into(buffer)


def deadline_rfile(sock: socket.socket, deadline_at: Callable[[], float]) -> io.BufferedReader:
    """A buffered `rfile` for a request handler whose every read keeps to `deadline_at()`."""
    return io.BufferedReader(DeadlineReader(sock, deadline_at))


def refuse(sock: socket.socket, reply: bytes) -> None:
    """Send `reply` (a whole HTTP response) on a connection that gets no handler, and read what
    already arrived of its request, so that closing it does not reset the reply away."""
    try:
        sock.settimeout(REFUSE_WRITE_TIMEOUT_S)
        sock.sendall(reply)
    except OSError:  # the client is gone
        return
    discard_arrived(sock)


def discard_arrived(sock: socket.socket) -> None:
    """Read and drop what has arrived on `sock` without waiting for more: a socket closed with
    unread data resets the connection, and the reply just sent may be lost with it."""
    try:
        sock.setblocking(False)
        while sock.recv(65536):
            pass
    except OSError:  # BlockingIOError: nothing more has arrived; or the client is gone
        pass


class CappedThreadingMixIn(ThreadingMixIn):
    """A thread per connection, at most `max_connections` at once; a connection over the cap is
    answered `full_reply` and closed by the accepting thread."""

    daemon_threads = True  # a slow client never holds the process up at exit
    max_connections = 16
    full_reply = PLAIN_503

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a new thread if a slot is free, else refuse it."""
        if not self._slots.acquire(blocking=False):
            log.debug("refused a connection from %s: %d held", client_address, self.max_connections)
            refuse(request, self.full_reply)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to give it back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Handle the connection, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone or cut off is a debug line; anything else a warning with its traceback
        (socketserver's default prints it to stderr, around the logging)."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
        else:
            log.warning("handling a request from %s failed", client_address, exc_info=True)
