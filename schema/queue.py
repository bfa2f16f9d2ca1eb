"""The Celery application shared by producers (which only send) and workers (which run tasks).

Delivery policy (see README, "Delivery and retries"): late acknowledgement, requeue when a
worker process dies, one prefetched job per worker thread, events on for Flower, and a
visibility timeout far above the longest job.

Every Redis client capworks opens (broker, leases, ledger, heartbeats, claims, status) comes from
`make_redis` (or the `RedisAddress` it reads), so a `rediss://` broker URL and its CA file, or a
`sentinel://` one and its primary's name (schema/sentinel.py), hold for all of them and for Celery.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from capworks.schema.redact import redact
from capworks.schema.redis_transport import Transport
from capworks.schema.sentinel import (
    is_sentinel_url,
    parse_sentinel_url,
    sentinel_master,
    transport_options,
)
from capworks.schema.settings import Settings

CAPTION_TASK = "capworks.caption_job"

# How long one fetch blocks in Redis (kombu's `brpop_timeout`, the BLMOVE's server-side wait in
# schema/redis_transport.py): a live server answers it within this, plus the round trip.
FETCH_WAIT_S = float(Transport.brpop_timeout)
# A synchronous broker command (the fetch's registration and claim, kombu's restore sweep and
# its lock, a publish) that waits longer than this is on a dead connection. Without it such a
# command, sent into a partition, blocked the consumer's loop until TCP's backed-off
# retransmissions got through (a host polled again 95 s after a 120 s partition healed; on
# loopback py-spy showed the restore sweep's lock stuck in recv). Far above FETCH_WAIT_S (the
# fetch's reply is read only once it has arrived); a timed-out command is not retried.
BROKER_SOCKET_TIMEOUT_S = 10.0
BROKER_CONNECT_TIMEOUT_S = 5.0
# kombu drops a blocking fetch whose reply is this much overdue, checking this often (and
# redis-py pings a connection idle this long before using it): a half-open fetch connection is
# replaced within FETCH_WAIT_S + 2 x this (21 s), against 51 s with kombu's default of 25.
BROKER_HEALTH_CHECK_S = 10
# An idle connection (the pub/sub one for events and control) whose peer vanished is found by
# TCP keepalive: first probe after 10 s idle, then every 5 s, dead after 3 unanswered (25 s).
KEEPALIVE_OPTIONS = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


def broker_socket_options() -> dict[str, Any]:
    """kombu transport options that keep a dead broker connection from blocking a worker: a
    socket timeout on every command, a connect timeout, keepalive and kombu's health checks."""
    return {
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
        "health_check_interval": BROKER_HEALTH_CHECK_S,
    }


def redis_tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keyword arguments for a `rediss://` broker URL (none for `redis://`):
    the certificate is always verified, against `redis_ca_file` when set."""
    if not settings.broker_url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    files = {
        "ssl_ca_certs": settings.redis_ca_file,
        "ssl_certfile": settings.redis_cert_file,
        "ssl_keyfile": settings.redis_key_file,
    }
    options.update({name: str(path) for name, path in files.items() if path is not None})
    return options


@dataclass(frozen=True)
class RedisAddress:
    """How to reach the broker's Redis: its URL, TLS options, and for a `sentinel://` URL the
    primary's name and the Sentinels' password."""

    url: str
    tls: dict[str, Any] = field(default_factory=dict)
    master_name: str | None = None
    sentinel_password: str | None = None

    def client(self, socket_timeout_s: float | None = None) -> redis.Redis:
        """A client of the broker's Redis (of the current primary, behind Sentinels)."""
        if is_sentinel_url(self.url):
            if not self.master_name:
                raise ValueError("a sentinel:// broker URL needs CAPWORKS_REDIS_MASTER_NAME")
            return sentinel_master(
                parse_sentinel_url(self.url),
                self.master_name,
                self.sentinel_password,
                socket_timeout_s,
            )
        return redis.Redis.from_url(
            self.url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            **self.tls,
        )


def redis_address(settings: Settings) -> RedisAddress:
    """Where the settings say the broker's Redis is."""
    secret = settings.redis_sentinel_password
    return RedisAddress(
        settings.broker_url,
        redis_tls_options(settings),
        settings.redis_master_name,
        secret.get_secret_value() if secret is not None else None,
    )


def make_redis(settings: Settings, socket_timeout_s: float | None = None) -> redis.Redis:
    """A client of the broker's Redis, with its password and TLS settings."""
    return redis_address(settings).client(socket_timeout_s)


def task_reprs(body: dict[str, Any], attempt: int | None = None) -> dict[str, str]:
    """`argsrepr` and `kwargsrepr` for a job message: what Flower and task events show instead
    of the arguments themselves (the job id, its size and first URI, redacted: a presigned
    URL's signature never reaches an event or a dashboard), and the attempt of a retry, which
    is a new task (Flower's own retry count stays 0)."""
    images = body.get("images") or []
    first = images[0][0] if images and isinstance(images[0], list | tuple) and images[0] else ""
    # Before the URI: a redacted URI's mask may take what follows it.
    label = f" (attempt {attempt})" if attempt is not None else ""
    summary = f"[job {body.get('id')}{label}: {len(images)} images, {first}]"
    return {"argsrepr": redact(summary)[:1024], "kwargsrepr": "{}"}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings; tasks are registered by `capworks.workers.tasks`."""
    app = Celery("capworks", broker=settings.broker_url)
    sentinels = is_sentinel_url(settings.broker_url)
    address = redis_address(settings)
    app.conf.update(
        # kombu's Redis transport with a fetch that cannot lose a job as Redis goes down
        # (schema/redis_transport.py); it blocks on one Redis list, so one priority step.
        broker_transport="capworks.schema.redis_transport:"
        + ("SentinelTransport" if sentinels else "Transport"),
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        task_routes={CAPTION_TASK: {"queue": settings.queue_name}},
        task_ignore_result=True,
        # Acknowledge only after every image of a job is committed; a lost worker's job is
        # delivered again (at once when a pool thread dies, after the visibility timeout when
        # the whole process is killed).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Each thread holds one job; the process holds `prefetch_jobs` jobs, enough to fill batches.
        worker_prefetch_multiplier=1,
        # kombu sweeps for jobs whose worker vanished every interval x throttle seconds;
        # throttle 1 makes the interval the only knob.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # kombu's restore holds a Redis lock (5 minutes by default); a worker that loses
            # Redis mid-restore cannot release it, so after a Redis restart no dead process's
            # job came back for 5 minutes (the fault suite's Redis restart). A restore takes
            # milliseconds; two racing after 15 s at worst deliver a job twice, which its done
            # mark drops.
            "unacked_mutex_expire": 15,
            "priority_steps": [0],
            **broker_socket_options(),
            **(
                transport_options(address.master_name or "", address.sentinel_password)
                if sentinels
                else {}
            ),
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # kombu passes these to redis-py's SSL connection; None for `redis://`.
        broker_use_ssl=redis_tls_options(settings) or None,
    )
    return app
