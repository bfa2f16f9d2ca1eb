"""Publishing many single-image jobs in one Redis round trip.

Celery's `send_task` costs about 1 ms a message here (it looks the exchange's bindings up in
Redis, pushes, and publishes a task-sent event), which caps one event consumer near 1,000
jobs/s. `BulkSender` builds each message with Celery's own `create_task_message` and kombu's own
envelope (`prepare_message`, `encode_body`), exactly what `send_task` pushes, and writes them in
one pipeline. No per-job sent mark is written (`Publisher.publish` keeps one for 7 days so that a
crawl cut off mid-page can resume; an event job is never resumed by id, and the sink's dedup key
already records it). It writes to the queue's list
directly, as kombu does for the default exchange routed by queue name; no task-sent events are
published for these jobs (Flower does not see them until a worker receives them).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.serialization import dumps

from capworks.schema.jobs import Job
from capworks.schema.queue import CAPTION_TASK, task_reprs

PERSISTENT = 2


class BulkSender:
    """Sends jobs to one queue, many per Redis round trip."""

    def __init__(self, app: Celery, redis: Any, queue: str) -> None:
        self._app = app
        self._redis = redis
        self._queue = queue
        self._connection: Any = None

    def send(self, jobs: Sequence[Job]) -> None:
        """Push every job in one pipeline; raises what Redis raised."""
        if not jobs:
            return
        channel = self._channel()
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.lpush(self._queue, json.dumps(self.message(channel, job)))
        pipe.execute()

    def message(self, channel: Any, job: Job) -> dict[str, Any]:
        """The kombu envelope `send_task` would push for this job."""
        body = job.to_wire()
        task = self._app.amqp.create_task_message(
            str(uuid.uuid4()),
            CAPTION_TASK,
            [body],
            {},
            # Celery's saferepr of the body is a third of the cost; the summary says as much.
            **task_reprs(body),
        )
        content_type, encoding, body = dumps(task.body, serializer="json")  # type: ignore[no-untyped-call]
        properties = {**task.properties, "delivery_mode": PERSISTENT}
        message: dict[str, Any] = channel.prepare_message(
            body, 0, content_type, encoding, task.headers, properties
        )
        message["body"], body_encoding = channel.encode_body(message["body"], "base64")
        message["properties"].update(body_encoding=body_encoding, delivery_tag=str(uuid.uuid4()))
        # The default exchange, routed by the queue's name: as `send_task` sends it.
        message["properties"]["delivery_info"].update(exchange="", routing_key=self._queue)
        return message

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = self._app.connection_for_write()
        return self._connection.default_channel

    def close(self) -> None:
        """Release the broker connection."""
        if self._connection is not None:
            self._connection.release()
            self._connection = None
