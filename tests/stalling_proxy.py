"""A TCP proxy on loopback that can stop answering without closing anything: the loopback
stand-in for a network partition (no namespaces needed).

While `cut()`, no byte is passed either way and no connection is closed, as when a link drops
every packet: a client's writes still succeed into its kernel buffer and its reads wait. After
`heal()` new connections pass again, but every connection that was open during the cut stays
silent, as a real one does for a while after a long partition (its retransmissions backed off to
minutes): only a client that gives up on it and reconnects is served again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StallingProxy:
    """Listens on 127.0.0.1 (a free port) in front of `target_port` on 127.0.0.1."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._cut = False
        self._open: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Stop passing bytes on every connection, open or yet to come."""
        with self._lock:
            self._cut = True
            for _, _, dead in self._open:
                dead.set()

    def heal(self) -> None:
        """Pass bytes on connections opened from now on; the others stay silent."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._listener.close()
        with self._lock:
            for client, upstream, _ in self._open:
                for sock in (client, upstream):
                    sock.close()
            self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            dead = threading.Event()
            with self._lock:
                if self._cut:
                    dead.set()  # accepted by the kernel, then never answered
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.append((client, upstream, dead))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, dead), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, dead: threading.Event) -> None:
        """Copy `src` to `dst` until either closes; once `dead`, read and drop."""
        try:
            while chunk := src.recv(1 << 16):
                if not dead.is_set():
                    dst.sendall(chunk)
        except OSError:
            pass  # the proxy or a peer closed it
        if not dead.is_set():
            dst.close()


@contextmanager
def stalling_proxy(target_port: int) -> Iterator[StallingProxy]:
    """A `StallingProxy` in front of `target_port`, closed afterwards."""
    proxy = StallingProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()
