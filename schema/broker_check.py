"""Start-up check of the Redis broker: it must not evict queued jobs, and should persist them.

Queued jobs live only in Redis until a worker commits them; SQL is the record of what is done,
not of what is waiting. A Redis that evicts keys under memory pressure (any `maxmemory-policy`
but `noeviction`) drops jobs silently, so it is refused unless a setting allows it. One that does
not persist (no AOF, no RDB snapshots) loses the queue on a restart: a warning, since
`capworks enqueue --reconcile` rebuilds the queue from SQL. Managed services often refuse
`CONFIG`; then nothing can be checked and the caller gets one warning.

Producers and workers call it once at start-up:

    warnings = check_broker(make_redis(settings),
                            settings.allow_evicting_broker)
"""

from __future__ import annotations

from typing import Any

import redis

from capworks.schema.errors import Code, Unreachable


class UnsafeBroker(ValueError):
    """The broker may drop queued jobs: its one-line reason says why and how to allow it."""


def check_broker(client: Any, allow_evicting: bool) -> list[str]:
    """Warning lines about the broker's eviction policy and persistence (none when all is well).

    Raises `UnsafeBroker` for an evicting policy unless `allow_evicting`, and `Unreachable` when
    the broker cannot be reached.
    """
    name = broker_name(client)
    try:
        config = {
            **client.config_get("maxmemory-policy"),
            **client.config_get("appendonly"),
            **client.config_get("save"),
        }
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unreachable(
            Code.STORAGE_UNAVAILABLE, f"cannot reach the broker at {name}: {exc}"
        ) from exc
    except redis.ResponseError as exc:  # CONFIG renamed away or denied, as managed services do
        return [
            f"broker at {name} refuses CONFIG ({str(exc).splitlines()[0]}): cannot check that "
            "it never evicts queued jobs (maxmemory-policy noeviction) and persists them"
        ]
    return _judge(name, config, allow_evicting)


def _judge(name: str, config: dict[str, str], allow_evicting: bool) -> list[str]:
    """The warnings (or the refusal) for a broker's `CONFIG GET` answers."""
    warnings = []
    policy = config.get("maxmemory-policy")
    if policy is None:
        warnings.append(f"broker at {name} does not say its maxmemory-policy: cannot check it")
    elif policy != "noeviction":
        reason = (
            f"broker at {name} has maxmemory-policy {policy}: under memory pressure Redis "
            "deletes keys, queued jobs among them"
        )
        if not allow_evicting:
            raise UnsafeBroker(
                f"{reason}; set it to noeviction, or CAPWORKS_ALLOW_EVICTING_BROKER=1 to run anyway"
            )
        warnings.append(f"{reason} (allowed by CAPWORKS_ALLOW_EVICTING_BROKER)")
    if config.get("appendonly") == "no" and config.get("save") == "":
        warnings.append(
            f'broker at {name} has no persistence (appendonly no, save ""): a restart loses '
            "every queued job; `capworks enqueue --reconcile SOURCE` enqueues them again"
        )
    return warnings


def broker_name(client: Any) -> str:
    """host:port/db of a redis-py client, for messages (never its password); the primary's
    name behind Sentinels."""
    kwargs = client.connection_pool.connection_kwargs
    if hasattr(client.connection_pool, "service_name"):  # redis-py's SentinelConnectionPool
        return f"Sentinel primary {client.connection_pool.service_name}/{kwargs.get('db', 0)}"
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
