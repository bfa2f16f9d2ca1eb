"""The fetch guard's address decision, as pure functions: which hosts and addresses an http(s)
fetch may connect to. The fetcher resolves a name once, asks `refusal` about every address it
got, and connects only to an address that passed (no second lookup for DNS to rebind)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata endpoints: refused even where a broader allowlisted network covers them; only
# an allowlist entry naming the address itself opens one.
METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host spells in canonical form (dotted quad, or IPv6 with or without
    brackets), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_odd_ipv4_spelling(host: str) -> bool:
    """True for IPv4 spelled as C's `inet_aton` reads it but not as a dotted quad: decimal
    (`2130706433`), hex (`0x7f000001`), octal (`0177.0.0.1`), short (`127.1`). Parsers disagree
    on what these mean, so a guard and a connector could see two different addresses."""
    if literal_address(host) is not None:
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def embedded_ipv4(address: IPAddress) -> IPAddress | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, Teredo's client, NAT64)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _why_not_public(address: IPAddress) -> str | None:
    if address in METADATA:
        return "a cloud metadata address"
    for test, what in (
        (address.is_loopback, "loopback"),
        (address.is_unspecified, "unspecified"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not global"),
    ):
        if test:
            return what
    return None


def refusal(address: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why a fetch may not connect to `address` (None: it may). Only global unicast addresses
    pass, unless an allowlisted network holds the address (and, for an IPv6 address that
    carries an IPv4 one, holds that too or the carried address is itself public)."""
    carried = embedded_ipv4(address)
    for candidate in (address, carried) if carried is not None else (address,):
        if _allowed(candidate, allow):
            continue
        why = _why_not_public(candidate)
        if why is not None:
            shown = f"{candidate} (in {address})" if candidate is not address else str(address)
            return f"{shown} is {why}"
    return None


def _allowed(address: IPAddress, allow: Iterable[IPNetwork]) -> bool:
    for net in allow:
        if address.version != net.version or address not in net:
            continue
        if address in METADATA and net.num_addresses != 1:
            continue
        return True
    return False


def host_refusal(host: str, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why a URL's host is refused before any lookup (None: resolve it, then ask `refusal` of
    each address): an odd IPv4 spelling always; a literal address by `refusal`."""
    if not host:
        return "no host"
    if is_odd_ipv4_spelling(host):
        return f"{host!r} spells an IPv4 address in a form parsers disagree on"
    literal = literal_address(host)
    return refusal(literal, allow) if literal is not None else None
