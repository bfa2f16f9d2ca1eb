"""The guard's explicit deny list (workers/guard.py) for blocks `ipaddress`'s flags miss, and a
redirect from https to plain http refused by the guarded fetch: the decision as pure functions,
then the fetch itself between a real loopback TLS server (a CA made here by `openssl`) and a
loopback http server that must see no request."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from certificates import make_certificates

from capworks.schema.errors import Code, StorageError
from capworks.workers.guard import denied_block, embedded_ipv4, host_refusal, refusal
from capworks.workers.http_fetch import GuardedHttp, redirect_refusal

ip = ipaddress.ip_address
net = ipaddress.ip_network
LOOPBACK = (net("127.0.0.0/8"),)


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # site-local (deprecated): no `ipaddress` flag catches it on 3.11
        "feff:ffff::1",  # the top of fec0::/10
        "192.0.0.8",  # IETF protocol assignments: only .0/29 and .170/31 are flagged
        "192.88.99.1",  # 6to4 relay anycast
        "3fff::1",  # documentation (RFC 9637), newer than this Python
        "64:ff9b:1::a00:1",  # local-use NAT64 carrying 10.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "::ffff:0:a00:1",  # IPv4-translated 10.0.0.1
        "2002:c0a8:101::1",  # 6to4 carrying 192.168.1.1
        "2002:a9fe:a9fe::1",  # 6to4 carrying the metadata address
        "64:ff9b::a9fe:a9fe",  # NAT64 carrying the metadata address
        "2001:db8:1:2:0:5efe:a00:1",  # ISATAP carrying 10.0.0.1
        "2606:4700:1:2:200:5efe:c0a8:101",  # ISATAP under a public prefix carrying 192.168.1.1
    ],
)
def test_blocks_the_flags_miss_or_that_carry_a_private_ipv4_are_refused(address: str) -> None:
    assert refusal(ip(address)) is not None
    assert host_refusal(f"[{address}]") is not None


def test_site_local_was_let_through_by_the_flags_alone() -> None:
    # What made the explicit list necessary: the flags pass it on this Python.
    site_local = ip("fec0::1")
    assert not (site_local.is_private or site_local.is_reserved or site_local.is_link_local)
    assert denied_block(site_local) == "site-local (deprecated), fec0::/10"
    assert refusal(site_local) == "fec0::1 is site-local (deprecated), fec0::/10"


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
        "2002:5db8:d70e::1",  # 6to4 carrying the public 93.184.215.14
        "2606:4700:1:2:0:5efe:5db8:d70e",  # ISATAP carrying a public address
        "192.31.196.1",  # AS112: special-purpose but globally reachable
    ],
)
def test_public_addresses_still_pass(address: str) -> None:
    assert refusal(ip(address)) is None


def test_isatap_and_nat64_carry_their_ipv4_address() -> None:
    assert embedded_ipv4(ip("2606:4700:1:2:200:5efe:c0a8:101")) == ip("192.168.1.1")
    assert embedded_ipv4(ip("64:ff9b::a9fe:a9fe")) == ip("169.254.169.254")
    assert embedded_ipv4(ip("2606:4700::1111")) is None


def test_an_allowlist_still_opens_a_denied_block_it_names() -> None:
    assert refusal(ip("fec0::1"), [net("fec0::/10")]) is None
    assert refusal(ip("192.0.0.8"), [net("192.0.0.0/24")]) is None


def test_a_redirect_from_https_to_http_is_refused_and_the_other_hops_are_not() -> None:
    assert redirect_refusal("https://a.example/x", "http://b.example/y") is not None
    assert redirect_refusal("https://a.example/x", "HTTP://a.example/x") is not None
    assert redirect_refusal(None, "http://a.example/x") is None
    assert redirect_refusal("http://a.example/x", "https://a.example/x") is None
    assert redirect_refusal("https://a.example/x", "https://b.example/y") is None
    assert redirect_refusal("http://a.example/x", "http://b.example/y") is None
    assert redirect_refusal(None, "file:///etc/passwd") is not None


@contextmanager
def serving(location: str | None, tls: ssl.SSLContext | None = None) -> Iterator[list[str]]:
    """A loopback server (TLS when `tls` is given) answering 302 to `location`, or 200 with a
    body when None; yields (base URL, then each path it was asked for)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            seen.append(self.path)
            self.send_response(302 if location else 200)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"img")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    seen.append(f"{scheme}://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_fetch_refuses_an_https_server_handing_over_to_http(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    http = GuardedHttp(10_000, 10.0, LOOPBACK, ssl_context=ssl.create_default_context(cafile=ca))
    with (
        serving(None) as plain,
        serving(None, server_tls) as end,
        serving(f"{end[0]}/end.png", server_tls) as https_hop,
        serving(f"{plain[0]}/img.png", server_tls) as downgrade,
    ):
        try:
            assert http.get(f"{https_hop[0]}/a.png") == b"img"  # https to https is followed
            with pytest.raises(StorageError) as refused:
                http.get(f"{downgrade[0]}/b.png")
        finally:
            http.close()
    assert refused.value.code is Code.FORBIDDEN_ADDRESS
    assert "from https to plain http" in refused.value.message
    assert end[1:] == ["/end.png"] and downgrade[1:] == ["/b.png"]
    assert plain[1:] == []  # the plain http server saw no request
