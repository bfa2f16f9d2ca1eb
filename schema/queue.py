"""The Celery application shared by producers (which only send) and workers (which run tasks).

Delivery policy (see README, "Delivery and retries"): late acknowledgement, requeue when a
worker process dies, one prefetched job per worker thread, events on for Flower, and a
visibility timeout far above the longest job.
"""

from __future__ import annotations

from celery import Celery

from schema.settings import Settings

CAPTION_TASK = "capworks.caption_job"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings; tasks are registered by `workers.tasks`."""
    app = Celery("capworks", broker=settings.broker_url)
    app.conf.update(
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
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app
