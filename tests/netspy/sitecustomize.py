"""A connect() spy for the loopback-only test (tests/test_no_packet_off_loopback.py), loaded by
every Python process started with this folder on PYTHONPATH: a connection to any address off
loopback is written to the file `CAPWORKS_TEST_CONNECT_LOG` names and refused before a packet
is sent. Loopback and Unix sockets pass untouched."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

LOG = os.environ.get("CAPWORKS_TEST_CONNECT_LOG")


def _addresses(address: Any) -> list[str]:
    """The IP addresses an AF_INET/AF_INET6 destination names (a host name resolved)."""
    host, port = address[0], address[1]
    try:
        return [str(ipaddress.ip_address(host.split("%")[0]))]
    except ValueError:
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _off_loopback(sock: socket.socket, address: Any) -> list[str]:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return []
    return [a for a in _addresses(address) if not ipaddress.ip_address(a).is_loopback]


def _guarded(real: Any) -> Any:
    def connect(self: socket.socket, address: Any) -> Any:
        off = _off_loopback(self, address)
        if off:
            with open(LOG or os.devnull, "a") as log:
                log.write(f"{os.getpid()} {address!r} -> {', '.join(off)}\n")
            raise ConnectionRefusedError(f"connect spy: {address!r} is off loopback")
        return real(self, address)

    return connect


if LOG:
    socket.socket.connect = _guarded(socket.socket.connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded(socket.socket.connect_ex)  # type: ignore[method-assign]
