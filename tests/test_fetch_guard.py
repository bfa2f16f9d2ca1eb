"""The fetch guard's address decision (workers/guard.py), as pure functions: no socket is opened."""

from __future__ import annotations

import ipaddress

import pytest

from capworks.schema.errors import Code, Kind, StorageError
from capworks.workers.guard import host_refusal, is_odd_ipv4_spelling, refusal

ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "fd00::1",
        "fd00:ec2::254",
        "fe80::1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "100.64.0.1",
        "240.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 around 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    ],
)
def test_addresses_that_are_not_public_unicast_are_refused(address: str) -> None:
    assert refusal(ip(address)) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_unicast_addresses_pass(address: str) -> None:
    assert refusal(ip(address)) is None


def test_an_allowlisted_network_opens_its_addresses_and_no_others() -> None:
    allow = [net("127.0.0.0/8"), net("::1/128")]
    assert refusal(ip("127.0.0.1"), allow) is None
    assert refusal(ip("::1"), allow) is None
    assert refusal(ip("10.0.0.1"), allow) is not None


def test_a_mapped_address_is_judged_by_the_ipv4_address_it_carries() -> None:
    assert refusal(ip("::ffff:127.0.0.1"), [net("::ffff:0:0/96")]) is not None
    assert refusal(ip("::ffff:127.0.0.1"), [net("::ffff:0:0/96"), net("127.0.0.0/8")]) is None


def test_metadata_stays_refused_under_a_broad_allowlist_unless_named() -> None:
    assert refusal(ip("169.254.169.254"), [net("169.254.0.0/16")]) is not None
    assert refusal(ip("169.254.1.1"), [net("169.254.0.0/16")]) is None
    assert refusal(ip("169.254.169.254"), [net("169.254.169.254/32")]) is None
    assert refusal(ip("fd00:ec2::254"), [net("fd00::/8")]) is not None


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1"])
def test_odd_ipv4_spellings_are_refused_even_when_loopback_is_allowed(host: str) -> None:
    assert is_odd_ipv4_spelling(host)
    assert host_refusal(host, [net("127.0.0.0/8")]) is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "10.0.0.1"])
def test_literal_hosts_are_decided_before_any_lookup(host: str) -> None:
    assert host_refusal(host) is not None


def test_a_name_is_left_to_the_lookup() -> None:
    assert host_refusal("images.example.com") is None
    assert not is_odd_ipv4_spelling("images.example.com")


def test_the_new_codes_are_permanent() -> None:
    for code in (Code.FORBIDDEN_ADDRESS, Code.FORBIDDEN_PATH, Code.TOO_MANY_REDIRECTS):
        assert StorageError(code, "x").kind is Kind.PERMANENT
