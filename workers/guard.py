"""The fetch guard's address decision, as pure functions: which hosts and addresses an http(s)
fetch may connect to. The fetcher resolves a name once, asks `refusal` about every address it
got, and connects only to an address that passed (no second lookup for DNS to rebind).

An address is judged first against `DENIED`, an explicit list of the IANA special-purpose and
deprecated blocks no image server sits in, and only then by `ipaddress`'s `is_*` flags: the
flags change between Python versions and miss some blocks (on 3.11 the deprecated site-local
`fec0::/10`, `192.0.0.0/24` and the 6to4 relay anycast `192.88.99.0/24` all pass them)."""

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
# ISATAP interface identifiers (RFC 5214): `::0:5efe:a.b.c.d` / `::200:5efe:a.b.c.d` after any
# /64 prefix; the site's ISATAP router tunnels such a packet to the IPv4 address it carries.
ISATAP_IDS = frozenset({0x00005EFE, 0x02005EFE})

_net = ipaddress.ip_network
# Never a public image server, whatever the Python version's flags say (IANA's IPv4 and IPv6
# special-purpose registries, "globally reachable: false", plus deprecated blocks). Blocks that
# carry an IPv4 address (6to4, Teredo, NAT64 64:ff9b::/96) are judged by what they carry too.
DENIED: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "'this network'"),
    (_net("10.0.0.0/8"), "private"),
    (_net("100.64.0.0/10"), "carrier-grade NAT (shared)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("172.16.0.0/12"), "private"),
    (_net("192.0.0.0/24"), "IETF protocol assignments"),
    (_net("192.0.2.0/24"), "documentation"),
    (_net("192.88.99.0/24"), "6to4 relay anycast (deprecated)"),
    (_net("192.168.0.0/16"), "private"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("198.51.100.0/24"), "documentation"),
    (_net("203.0.113.0/24"), "documentation"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved"),
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    (_net("::/96"), "IPv4-compatible (deprecated)"),
    (_net("::ffff:0:0/96"), "IPv4-mapped"),
    (_net("::ffff:0:0:0/96"), "IPv4-translated"),
    (_net("64:ff9b:1::/48"), "local-use NAT64"),
    (_net("100::/64"), "discard-only"),
    (_net("2001::/23"), "IETF protocol assignments (Teredo included)"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("3fff::/20"), "documentation"),
    (_net("5f00::/16"), "segment routing (SRv6) SIDs"),
    (_net("fc00::/7"), "unique local (private)"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local (deprecated)"),
    (_net("ff00::/8"), "multicast"),
)


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
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, Teredo's client, NAT64, an
    ISATAP interface identifier)."""
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
    if (int(address) >> 32) & 0xFFFFFFFF in ISATAP_IDS:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def denied_block(address: IPAddress) -> str | None:
    """What `DENIED` calls the block holding `address` (None: in none of them)."""
    for network, what in DENIED:
        if address.version == network.version and address in network:
            return f"{what}, {network}"
    return None


def _why_not_public(address: IPAddress) -> str | None:
    if address in METADATA:
        return "a cloud metadata address"
    denied = denied_block(address)
    if denied is not None:
        return denied
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
