"""The http(s) fetch guard wired into the fetcher: real loopback servers, and a resolver and a
connector injected through the guard's seams. No packet leaves loopback: every non-loopback
address is refused before the connector is asked, and the connector fails the test if it is
ever asked for one."""

from __future__ import annotations

import gzip
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import pytest
from conftest import png_bytes, run_cli
from pipeline_support import captions, failures

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.errors import Code, StorageError
from capworks.workers.guard import IPAddress, IPNetwork
from capworks.workers.http_fetch import MAX_REDIRECTS, GuardedHttp

LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
Reply = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Served:
    """A loopback server's base URL and the requests it saw (path, headers)."""

    base: str
    port: int
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@contextmanager
def loopback_server(reply: Reply) -> Iterator[Served]:
    """An HTTP server on 127.0.0.1 answering every GET with `reply`, stopped afterwards."""
    served = Served("", 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            served.requests.append((self.path, dict(self.headers.items())))
            try:
                reply(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading, as it should at its limit

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    served.port = server.server_address[1]
    served.base = f"http://127.0.0.1:{served.port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def body(data: bytes, *headers: tuple[str, str]) -> Reply:
    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    return reply


def redirect(location: Callable[[str], str]) -> Reply:
    """302 to `location(request path)`."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location(h.path))
        h.send_header("Content-Length", "0")
        h.end_headers()

    return reply


class FakeResolver:
    """A DNS of fixed answers; each name's answers are given in turn (the last one repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self._answers = answers
        self.asked: list[str] = []

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        turns = self._answers[host]
        answer = turns[min(self.asked.count(host) - 1, len(turns) - 1)]
        return [ipaddress.ip_address(a) for a in answer]


class FakeConnector(httpcore.NetworkBackend):
    """httpcore's own connector, recording what it is asked; it fails the test if asked for a
    non-loopback address (nothing may leave this host). `lands_on` makes every connection land
    on that loopback port whatever was asked, as a second lookup behind the guard would."""

    def __init__(self, lands_on: int | None = None) -> None:
        self.asked: list[tuple[str, int]] = []
        self._lands_on = lands_on
        self._real = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        self.asked.append((host, port))
        if self._lands_on is not None:
            return self._real.connect_tcp("127.0.0.1", self._lands_on, timeout)
        if not ipaddress.ip_address(host).is_loopback:
            pytest.fail(f"the guard let a connection to {host} through")
        return self._real.connect_tcp(host, port, timeout, local_address, socket_options)


def guarded(
    allow: tuple[IPNetwork, ...] = (),
    *,
    resolver: FakeResolver | None = None,
    connector: FakeConnector | None = None,
    max_bytes: int = 1024 * 1024,
    deadline_s: float = 10.0,
) -> GuardedHttp:
    return GuardedHttp(max_bytes, deadline_s, allow, resolver=resolver, connector=connector)


def refused_code(http: GuardedHttp, uri: str) -> Code:
    with pytest.raises(StorageError) as info:
        http.get(uri)
    return info.value.code


def test_an_allowlisted_loopback_server_is_fetched_through_the_judged_address() -> None:
    with loopback_server(body(b"image bytes")) as srv:
        connector = FakeConnector()
        resolver = FakeResolver({"images.example": [["127.0.0.1"]]})
        http = guarded(LOOPBACK, resolver=resolver, connector=connector)
        assert http.get(f"{srv.base}/a.png") == b"image bytes"
        assert http.get(f"http://images.example:{srv.port}/b.png") == b"image bytes"
    # The name was looked up once and the connection went to the address, not the name.
    assert resolver.asked == ["images.example"]
    assert connector.asked == [("127.0.0.1", srv.port), ("127.0.0.1", srv.port)]
    assert srv.requests[1][1]["Host"] == f"images.example:{srv.port}"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "127.1",
        "localhost",  # the system's resolver maps it to loopback
    ],
)
def test_loopback_in_any_spelling_is_refused_and_the_server_sees_no_request(host: str) -> None:
    with loopback_server(body(b"secret")) as srv:
        connector = FakeConnector()
        http = guarded(connector=connector)
        assert refused_code(http, f"http://{host}:{srv.port}/") is Code.FORBIDDEN_ADDRESS
    assert srv.requests == [] and connector.asked == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "127.1"])
def test_odd_ipv4_spellings_are_refused_even_where_loopback_is_allowed(host: str) -> None:
    connector = FakeConnector()
    assert refused_code(guarded(LOOPBACK, connector=connector), f"http://{host}/") is (
        Code.FORBIDDEN_ADDRESS
    )
    assert connector.asked == []


@pytest.mark.parametrize(
    "address", ["10.0.0.5", "172.16.0.1", "192.168.1.1", "169.254.169.254", "fd00::1", "::"]
)
def test_a_public_looking_name_that_resolves_inside_is_refused_before_connecting(
    address: str,
) -> None:
    connector = FakeConnector()
    resolver = FakeResolver({"cdn.example.com": [["93.184.216.34", address]]})
    http = guarded(resolver=resolver, connector=connector)
    with pytest.raises(StorageError) as info:
        http.get("http://cdn.example.com/cat.jpg")
    assert info.value.code is Code.FORBIDDEN_ADDRESS and address in info.value.message
    assert connector.asked == []  # one refused address refuses the name


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.1.2.3/",
        "http://[::ffff:169.254.169.254]/",
        "https://192.168.0.1/",
    ],
)
def test_literal_inside_addresses_are_refused_before_connecting(uri: str) -> None:
    connector = FakeConnector()
    # A broad allowlist entry does not open the metadata address; nothing opens the others.
    http = guarded((ipaddress.ip_network("169.254.0.0/16"),), connector=connector)
    assert refused_code(http, uri) is Code.FORBIDDEN_ADDRESS
    assert connector.asked == []


def test_a_redirect_to_the_metadata_address_is_refused_before_connecting() -> None:
    target = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    with loopback_server(redirect(lambda _: target)) as srv:
        connector = FakeConnector()
        http = guarded(LOOPBACK, connector=connector)
        assert refused_code(http, f"{srv.base}/photo.jpg") is Code.FORBIDDEN_ADDRESS
    assert connector.asked == [("127.0.0.1", srv.port)]  # the first hop only


def test_a_redirect_to_a_name_that_resolves_inside_is_refused() -> None:
    resolver = FakeResolver({"internal.example": [["10.0.0.7"]]})
    with loopback_server(redirect(lambda _: "http://internal.example/admin")) as srv:
        connector = FakeConnector()
        http = guarded(LOOPBACK, resolver=resolver, connector=connector)
        assert refused_code(http, f"{srv.base}/photo.jpg") is Code.FORBIDDEN_ADDRESS
    assert connector.asked == [("127.0.0.1", srv.port)] and resolver.asked == ["internal.example"]


def test_a_redirect_to_another_scheme_is_refused() -> None:
    with loopback_server(redirect(lambda _: "file:///etc/passwd")) as srv:
        assert refused_code(guarded(LOOPBACK), f"{srv.base}/x") is Code.FORBIDDEN_ADDRESS


def test_a_redirect_loop_ends_after_the_cap_with_too_many_redirects() -> None:
    with loopback_server(redirect(lambda path: path)) as srv:
        assert refused_code(guarded(LOOPBACK), f"{srv.base}/loop") is Code.TOO_MANY_REDIRECTS
    assert len(srv.requests) == MAX_REDIRECTS + 1


def test_the_cap_of_redirects_itself_is_followed() -> None:
    def reply(h: BaseHTTPRequestHandler) -> None:
        hops = int(h.path.strip("/"))
        redirect(lambda _: f"/{hops + 1}")(h) if hops < MAX_REDIRECTS else body(b"end")(h)

    with loopback_server(reply) as srv:
        assert guarded(LOOPBACK).get(f"{srv.base}/0") == b"end"


def test_dns_rebinding_between_check_and_connect_is_refused_at_the_socket() -> None:
    """The name resolves to a public address when judged; the connection lands on loopback
    (as if something behind the guard looked it up again): the socket's peer is judged too."""
    with loopback_server(body(b"internal")) as srv:
        resolver = FakeResolver({"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
        connector = FakeConnector(lands_on=srv.port)
        http = guarded(resolver=resolver, connector=connector)
        with pytest.raises(StorageError) as info:
            http.get(f"http://rebind.example:{srv.port}/")
    assert info.value.code is Code.FORBIDDEN_ADDRESS and "connected to 127.0.0.1" in (
        info.value.message
    )
    assert resolver.asked == ["rebind.example"]  # looked up once, never again
    assert connector.asked == [("93.184.216.34", srv.port)]  # asked for the judged address
    assert srv.requests == []  # refused before a byte was sent


def test_a_gzip_bomb_is_returned_as_sent_never_inflated() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    with loopback_server(body(bomb, ("Content-Encoding", "gzip"))) as srv:
        got = guarded(LOOPBACK, max_bytes=1024 * 1024).get(f"{srv.base}/bomb.png")
    assert got == bomb  # about 64 KiB: the decoder sees gzip, not 64 MiB of zeros
    assert srv.requests[0][1]["Accept-Encoding"] == "identity"


def test_an_endless_body_is_cut_at_the_byte_limit() -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        while True:
            h.wfile.write(b"x" * 65536)

    with loopback_server(endless) as srv:
        got = guarded(LOOPBACK, max_bytes=300_000).get(f"{srv.base}/endless")
    assert len(got) == 300_001  # one byte over: the decoder refuses it as too large


def test_a_slow_drip_server_trips_the_total_deadline() -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.05)

    with loopback_server(drip) as srv:
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            guarded(LOOPBACK, deadline_s=1.0).get(f"{srv.base}/slow")
        took_s = time.monotonic() - started
    assert info.value.code is Code.STORAGE_UNAVAILABLE and "within 1 s" in info.value.message
    assert took_s < 2.0


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, Code.NOT_FOUND),
        (410, Code.NOT_FOUND),
        (403, Code.ACCESS_DENIED),
        (503, Code.STORAGE_UNAVAILABLE),
    ],
)
def test_http_statuses_keep_their_codes(status: int, code: Code) -> None:
    with loopback_server(lambda h: h.send_error(status)) as srv:
        assert refused_code(guarded(LOOPBACK), f"{srv.base}/x") is code


def test_proxies_in_the_environment_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    with loopback_server(body(b"direct")) as srv:
        assert guarded(LOOPBACK).get(f"{srv.base}/a") == b"direct"


@pytest.mark.slow
def test_capworks_caption_dead_letters_a_forbidden_url_and_captions_the_rest(
    tmp_path: Path, shapes_dir: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    scenes = sample_scenes(3, seed=5)
    for i, (img, _) in enumerate(scenes[:2]):
        (folder / f"local{i}.png").write_bytes(png_bytes(img))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with loopback_server(body(png_bytes(scenes[2][0]))) as srv:
        forbidden, named = f"{srv.base}/served.png", f"http://localhost:{srv.port}/named.png"
        args = ["caption", str(folder), forbidden, named, "--model", "shapes", "--db", url]
        refused = run_cli(*args, "--json", "--no-progress")
        assert refused.returncode == 3, refused.stderr[-3000:]  # 3: some images failed
        assert srv.requests == []  # refused before connecting
        allowed = run_cli(*args, "--allow-address", "127.0.0.0/8", "--no-progress")
        assert allowed.returncode == 0, allowed.stderr[-3000:]
    lines = {d["uri"]: d for d in map(json.loads, refused.stdout.splitlines())}
    assert lines[forbidden]["error"] == lines[named]["error"] == "forbidden_address"
    assert sum("caption" in d for d in lines.values()) == 2  # the folder's images
    assert failures(url) == {}  # the second run, allowed, captioned both URLs
    assert {forbidden, named} <= set(captions(url)) and len(srv.requests) == 2


def test_a_cookie_one_server_sets_is_not_sent_with_the_next_fetch() -> None:
    with loopback_server(body(b"img", ("Set-Cookie", "session=abc; Path=/"))) as srv:
        http = guarded(LOOPBACK)
        http.get(f"{srv.base}/first")
        http.get(f"{srv.base}/second")
    assert "Cookie" not in srv.requests[1][1]
