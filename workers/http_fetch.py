"""Guarded http(s) fetches: a host is resolved once, every address it resolves to is judged by
`workers.guard`, the connection goes to a judged address, and the address actually connected to
is judged again, so DNS cannot rebind between check and connect. Redirects are followed by hand
(each hop judged anew, at most `MAX_REDIRECTS`); bodies are read raw (never decompressed) up to
a byte limit, under one deadline for the whole fetch.

The deadline is held on the connection, not only between body chunks: name resolution runs in a
thread waited on for the time left, and every connect, TLS handshake, read and write of the
fetch's connection gets the time left as its socket timeout (`DeadlineStream`), so a server that
dribbles its status line, headers or body a byte at a time, or stalls a handshake, cannot hold a
fetch past its deadline. The deadline is per fetch (a context variable the fetch sets), so a
kept-alive connection takes the deadline of whichever fetch uses it. Socket timeouts were chosen
over a watchdog that closes the socket at the deadline: no extra thread per fetch and no race
between the watchdog and a connection going back to the pool."""

from __future__ import annotations

import ipaddress
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Protocol, TypeVar

import httpcore
import httpx

from capworks.schema.errors import Code, StorageError
from capworks.workers.guard import IPAddress, IPNetwork, host_refusal, literal_address, refusal

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
T = TypeVar("T")
# The monotonic time the fetch running in this thread must end by (None: no fetch is running).
_deadline: ContextVar[float | None] = ContextVar("capworks_fetch_deadline", default=None)


class DeadlinePassed(httpcore.ReadTimeout):
    """The fetch's deadline passed while its connection was being used."""


def time_left_s(timeout: float | None) -> float | None:
    """The socket timeout an operation of the running fetch gets: the time left before its
    deadline (or httpx's own timeout, if shorter); `DeadlinePassed` once none is left."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise DeadlinePassed("the fetch's deadline passed")
    return left_s if timeout is None else min(timeout, left_s)


def within_deadline(what: str, work: Callable[[], T]) -> T:
    """`work()` run in a thread of its own and waited on for the time left (name resolution
    cannot be given a timeout); past the deadline the thread is left to finish alone."""
    left_s = time_left_s(None)
    if left_s is None:
        return work()
    answers: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def run() -> None:
        try:
            answers.put((True, work()))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
            answers.put((False, exc))

    threading.Thread(target=run, name="capworks-resolve", daemon=True).start()
    try:
        ok, value = answers.get(timeout=left_s)
    except queue.Empty:
        raise StorageError(
            Code.STORAGE_UNAVAILABLE, f"{what}: not done within the fetch's deadline"
        ) from None
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake gets the running fetch's time
    left as its timeout (see `time_left_s`)."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """At most `max_bytes`, waiting no longer than the time left."""
        return self._stream.read(max_bytes, time_left_s(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send `buffer`, waiting no longer than the time left."""
        self._stream.write(buffer, time_left_s(timeout))

    def close(self) -> None:
        """Close the connection."""
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """The TLS connection, its handshake done within the time left (CPython's handshake
        holds one deadline for the whole exchange)."""
        tls = self._stream.start_tls(ssl_context, server_hostname, time_left_s(timeout))
        return DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        """What the wrapped stream says (peer address, ssl object, ...)."""
        return self._stream.get_extra_info(info)


class Resolver(Protocol):
    """Host names to addresses: the seam where a test plugs in its own DNS."""

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` has (empty when it has none)."""
        ...


class SystemResolver:
    """The operating system's resolver (`getaddrinfo`)."""

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` has, each once, in the resolver's order."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot resolve {host!r}: {exc}") from exc
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def forbidden(host: str, why: str) -> StorageError:
    """The permanent failure of a fetch the guard refuses."""
    return StorageError(Code.FORBIDDEN_ADDRESS, f"refused to connect to {host!r}: {why}")


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's connector with the guard in front: it resolves the host itself, refuses it
    when any address is refused, connects to a judged address (never to the name), and judges
    the peer of the socket it got before any byte is sent. `connector` makes the connection
    (httpcore's own by default; a test's stand-in records what it was asked). Resolution,
    connect and every later use of the connection end by the running fetch's deadline."""

    def __init__(
        self,
        allow: Sequence[IPNetwork],
        resolver: Resolver,
        connector: httpcore.NetworkBackend,
    ) -> None:
        self._allow = allow
        self._resolver = resolver
        self._connector = connector

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """A stream to a judged address of `host`, or `StorageError(FORBIDDEN_ADDRESS)`."""
        why = host_refusal(host, self._allow)
        if why is not None:
            raise forbidden(host, why)
        literal = literal_address(host)
        addresses = (
            [literal]
            if literal is not None
            else within_deadline(f"resolve {host!r}", lambda: self._resolver.resolve(host, port))
        )
        if not addresses:
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{host!r} has no address")
        for address in addresses:  # one refused address refuses the name: no mixed answers
            why = refusal(address, self._allow)
            if why is not None:
                raise forbidden(host, f"it resolves to {why}")
        stream = self._connect_first(addresses, port, timeout, local_address, socket_options)
        peer = stream.get_extra_info("server_addr")
        why = "no peer address" if not peer else refusal(ipaddress.ip_address(peer[0]), self._allow)
        if why is not None:
            stream.close()
            raise forbidden(host, f"connected to {why}")
        return DeadlineStream(stream)

    def _connect_first(
        self,
        addresses: list[IPAddress],
        port: int,
        timeout: float | None,
        local_address: str | None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
    ) -> httpcore.NetworkStream:
        for address in addresses[:-1]:
            try:
                return self._connector.connect_tcp(
                    str(address), port, time_left_s(timeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue  # the next judged address may answer
        last = str(addresses[-1])
        return self._connector.connect_tcp(
            last, port, time_left_s(timeout), local_address, socket_options
        )


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport on a `PinnedBackend`, proxies never taken from the environment;
    https verified against `ssl_context` (the default CAs when None)."""

    def __init__(self, backend: PinnedBackend, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(trust_env=False)
        # httpx takes no network backend of its own, so its pool is rebuilt with ours
        # (tests/test_ssrf.py fails if a connection ever bypasses it).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(), network_backend=backend
        )


class GuardedHttp:
    """http(s) GETs that reach only the addresses the guard lets through: public ones, and
    those in `allow`. `ssl_context` is the seam for a private CA (the default CAs when None)."""

    def __init__(
        self,
        max_bytes: int,
        deadline_s: float,
        allow: Sequence[IPNetwork] = (),
        *,
        resolver: Resolver | None = None,
        connector: httpcore.NetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._deadline_s = deadline_s
        backend = PinnedBackend(
            allow, resolver or SystemResolver(), connector or httpcore.SyncBackend()
        )
        self._client = httpx.Client(
            transport=PinnedTransport(backend, ssl_context),
            # No cookie one job's server set is sent along with another job's fetch.
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            trust_env=False,
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
        )

    def get(self, uri: str) -> bytes:
        """At most `max_bytes + 1` bytes of the body at `uri`, exactly as sent (a gzip body is
        not inflated), or `StorageError` with a code."""
        deadline = time.monotonic() + self._deadline_s
        url = uri
        token = _deadline.set(deadline)
        try:
            previous = None
            for _hop in range(MAX_REDIRECTS + 1):
                why = redirect_refusal(previous, url)
                if why is not None:
                    raise forbidden(url, why)
                previous = url
                timeout = self._remaining_s(deadline, uri)
                with self._client.stream("GET", url, timeout=timeout) as resp:
                    location = resp.headers.get("location")
                    if resp.status_code in REDIRECT_STATUSES and location:
                        url = str(resp.url.join(location))
                        continue
                    check_status(uri, resp.status_code)
                    return self._read(resp, deadline, uri)
        except httpx.TimeoutException as exc:
            if time.monotonic() >= deadline:
                raise self._late(uri) from exc
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{uri}: timed out: {exc}") from exc
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise StorageError(Code.BAD_URI, f"{uri}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{uri}: {exc}") from exc
        finally:
            _deadline.reset(token)
        raise StorageError(Code.TOO_MANY_REDIRECTS, f"{uri}: more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def _read(self, resp: httpx.Response, deadline: float, uri: str) -> bytes:
        data = bytearray()
        for chunk in resp.iter_raw():
            data += chunk
            if len(data) > self._max_bytes:  # the decoder refuses it as too large
                return bytes(data[: self._max_bytes + 1])
            self._remaining_s(deadline, uri)
        return bytes(data)

    def _remaining_s(self, deadline: float, uri: str) -> float:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise self._late(uri)
        return left_s

    def _late(self, uri: str) -> StorageError:
        return StorageError(
            Code.STORAGE_UNAVAILABLE, f"{uri}: not fetched within {self._deadline_s:g} s"
        )


def redirect_refusal(previous: str | None, url: str) -> str | None:
    """Why a fetch may not go on to `url` after `previous` (None for the first hop): a scheme
    other than http(s), or https handing over to plain http, where anyone on the path could
    read the request (a presigned query, say) and answer in the server's name."""
    scheme = httpx.URL(url).scheme
    if scheme not in ("http", "https"):
        return f"{scheme}: is not http or https"
    if previous is not None and httpx.URL(previous).scheme == "https" and scheme == "http":
        return "a redirect from https to plain http"
    return None


def check_status(uri: str, status: int) -> None:
    """Raise the failure an HTTP status other than success means."""
    if status < 300:
        return
    if status in (404, 410):
        raise StorageError(Code.NOT_FOUND, f"{uri}: HTTP {status}")
    if status in (401, 403):
        raise StorageError(Code.ACCESS_DENIED, f"{uri}: HTTP {status}")
    raise StorageError(Code.STORAGE_UNAVAILABLE, f"{uri}: HTTP {status}")
