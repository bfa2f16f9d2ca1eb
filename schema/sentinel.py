"""Redis behind Sentinels: `sentinel://` broker URLs, in kombu's own syntax.

    CAPWORKS_BROKER_URL='sentinel://:PASSWORD@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;...'
    CAPWORKS_REDIS_MASTER_NAME=capworks

Each `;`-separated URL names one Sentinel; the first carries the Redis password (the primary's
and replicas' `requirepass`) and the database number, as kombu reads them. A client asks the
Sentinels for the current primary on every new connection, so after a failover a reconnect
reaches the new primary by itself. The Sentinels' own password, when they have one, is
`CAPWORKS_REDIS_SENTINEL_PASSWORD`. TLS to Sentinels is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SCHEME = "sentinel://"
DEFAULT_PORT = 26379


class BadSentinelUrl(ValueError):
    """A `sentinel://` URL that does not parse; the message says which part and why."""


@dataclass(frozen=True)
class SentinelAddress:
    """The Sentinels to ask, and what to give the primary they name."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    """Whether a broker URL names Sentinels rather than one Redis."""
    return url.startswith(SCHEME)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The Sentinels of a `sentinel://h1:p1[/db];sentinel://h2:p2` URL; `BadSentinelUrl`
    otherwise (the message never repeats a password)."""
    sentinels: list[tuple[str, int]] = []
    first = None
    for i, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        if not is_sentinel_url(part):
            raise BadSentinelUrl(f"Sentinel {i + 1} of the broker URL is not a sentinel:// URL")
        parts = urlsplit(part)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise BadSentinelUrl(f"Sentinel {i + 1} of the broker URL: {exc}") from None
        if not parts.hostname:
            raise BadSentinelUrl(f"Sentinel {i + 1} of the broker URL has no host")
        sentinels.append((parts.hostname, port))
        first = first or parts
    if first is None:
        raise BadSentinelUrl("the sentinel:// broker URL names no Sentinel")
    path = first.path.strip("/")
    if path and not path.isdigit():
        raise BadSentinelUrl(f"the broker URL's database {path!r} is not a number")
    return SentinelAddress(
        tuple(sentinels),
        int(path or 0),
        unquote(first.username) if first.username else None,
        unquote(first.password) if first.password else None,
    )


def sentinel_master(
    address: SentinelAddress,
    master_name: str,
    sentinel_password: str | None = None,
    socket_timeout_s: float | None = None,
) -> redis.Redis:
    """A client of the primary the Sentinels name `master_name`; every new connection asks
    them again, so it follows a failover."""
    sentinels = Sentinel(
        list(address.sentinels),
        sentinel_kwargs={
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": socket_timeout_s,
            "password": sentinel_password,
        },
    )
    client: redis.Redis = sentinels.master_for(
        master_name,
        db=address.db,
        username=address.username,
        password=address.password,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
    )
    return client


def transport_options(master_name: str, sentinel_password: str | None) -> dict[str, Any]:
    """kombu's Sentinel transport options: the primary's name and the Sentinels' password."""
    options: dict[str, Any] = {"master_name": master_name}
    if sentinel_password:
        options["sentinel_kwargs"] = {"password": sentinel_password}
    return options
