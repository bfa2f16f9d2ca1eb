"""The Celery application shared by producers (which only send) and workers (which run tasks).

Delivery policy (see README, "Delivery and retries"): late acknowledgement, requeue when a
worker process dies, one prefetched job per worker thread, events on for Flower, and a
visibility timeout far above the longest job.

Every Redis client capworks opens (broker, leases, ledger, heartbeats, claims, status) comes from
`make_redis`, so a `rediss://` broker URL and its CA file hold for all of them and for Celery.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
from celery import Celery

from capworks.schema.redact import redact
from capworks.schema.settings import Settings

CAPTION_TASK = "capworks.caption_job"


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


def make_redis(settings: Settings, socket_timeout_s: float | None = None) -> redis.Redis:
    """A client of the broker's Redis, with its password and TLS settings."""
    return redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        **redis_tls_options(settings),
    )


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
    app.conf.update(
        # kombu's Redis transport with a fetch that cannot lose a job as Redis goes down
        # (schema/redis_transport.py); it blocks on one Redis list, so one priority step.
        broker_transport="capworks.schema.redis_transport:Transport",
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
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # kombu passes these to redis-py's SSL connection; None for `redis://`.
        broker_use_ssl=redis_tls_options(settings) or None,
    )
    return app
