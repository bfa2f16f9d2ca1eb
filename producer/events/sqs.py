"""SQS long-polling: S3 notifications (direct, SNS-wrapped, or EventBridge) become jobs.

Up to 10 messages per receive. A message is deleted only after every job it holds is published
(or was published before: a duplicate), so a consumer killed between publishing and deleting
loses nothing, and the redelivery is absorbed as a duplicate. While a publish runs, a heartbeat
extends the messages' visibility. A body that is not an event notification is kept in
`bad_messages` and deleted (it can never parse); a message whose publish failed, or whose object
another consumer is publishing right now, is left to reappear, so the queue's own redrive policy
(maxReceiveCount, a dead-letter queue) deals with one that keeps failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from capworks.producer.events.records import BadRecord, MalformedEvent, ObjectCreated, parse_body
from capworks.producer.events.sink import EventSink, Outcome
from capworks.schema.backoff import compute_backoff

log = logging.getLogger(__name__)
MAX_MESSAGES = 10  # SQS's limit per receive


@dataclass
class SqsCounts:
    """What a consumer did so far."""

    received: int = 0
    deleted: int = 0
    published: int = 0
    duplicates: int = 0
    ignored: int = 0
    bad: int = 0
    kept: int = 0  # left on the queue to be received again


class SqsConsumer:
    """Receives from one queue and hands the events to an `EventSink`."""

    def __init__(
        self,
        client: Any,
        queue_url: str,
        sink: EventSink,
        wait_s: int = 20,
        visibility_timeout_s: int = 60,
    ) -> None:
        self._sqs = client
        self._url = queue_url
        self._sink = sink
        self._wait_s = wait_s
        self._visibility_s = visibility_timeout_s
        self.counts = SqsCounts()

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; a failing broker, database or SQS is waited out."""
        failures = 0
        while not stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except (BotoCoreError, ClientError, RedisError, SQLAlchemyError) as exc:
                failures += 1
                delay_s = compute_backoff(failures, 1.0, 30.0)
                log.error("SQS consumer: %s; trying again in %.1f s", exc, delay_s)
                stop.wait(delay_s)

    def poll_once(self) -> int:
        """One long poll and what follows; returns how many messages were received."""
        reply = self._sqs.receive_message(
            QueueUrl=self._url,
            MaxNumberOfMessages=MAX_MESSAGES,
            WaitTimeSeconds=self._wait_s,
            VisibilityTimeout=self._visibility_s,
        )
        messages = reply.get("Messages", [])
        if messages:
            self.handle(messages)
        return len(messages)

    def handle(self, messages: list[dict[str, Any]]) -> None:
        """Publish the events of received messages, then delete the ones that are done."""
        self.counts.received += len(messages)
        events: list[ObjectCreated] = []
        owner: list[int] = []  # the message index of each event
        for index, message in enumerate(messages):
            job_key = f"events:sqs:{message.get('MessageId', '?')}"
            try:
                parsed = parse_body(message.get("Body", ""))
            except MalformedEvent as exc:
                self._sink.record_bad(job_key, [BadRecord(exc.message, message.get("Body", ""))])
                self.counts.bad += 1
                continue
            self._sink.record_bad(job_key, parsed.bad)
            self.counts.bad += len(parsed.bad)
            self.counts.ignored += parsed.ignored
            events.extend(parsed.created)
            owner.extend([index] * len(parsed.created))
        with self._heartbeat(messages):
            outcomes = self._sink.publish(events)
        keep = {owner[i] for i, o in enumerate(outcomes) if o is Outcome.IN_FLIGHT}
        self.counts.published += outcomes.count(Outcome.PUBLISHED)
        self.counts.duplicates += outcomes.count(Outcome.DUPLICATE)
        self.counts.kept += len(keep)
        done = [m for i, m in enumerate(messages) if i not in keep]
        self._delete(done)

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
        ]
        reply = self._sqs.delete_message_batch(QueueUrl=self._url, Entries=entries)
        failed = reply.get("Failed", [])
        for failure in failed:  # it reappears and is absorbed as a duplicate
            log.warning("SQS delete failed: %s", failure.get("Message", failure))
        self.counts.deleted += len(messages) - len(failed)

    @contextmanager
    def _heartbeat(self, messages: list[dict[str, Any]]) -> Iterator[None]:
        """Extend the messages' visibility every third of the timeout while the block runs."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self._visibility_s / 3):
                self.extend_visibility(messages)

        thread = threading.Thread(target=beat, name="sqs-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def extend_visibility(self, messages: list[dict[str, Any]]) -> None:
        """Give the messages another full visibility timeout from now."""
        entries = [
            {
                "Id": str(i),
                "ReceiptHandle": m["ReceiptHandle"],
                "VisibilityTimeout": self._visibility_s,
            }
            for i, m in enumerate(messages)
        ]
        try:
            self._sqs.change_message_visibility_batch(QueueUrl=self._url, Entries=entries)
            log.info("extended the visibility of %d messages", len(entries))
        except (BotoCoreError, ClientError) as exc:  # the publish goes on; at worst a duplicate
            log.warning("could not extend SQS visibility: %s", exc)


def wait_for_queue(client: Any, queue_url: str, timeout_s: float = 30.0) -> None:
    """Fail early with one clear line when the queue does not answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"SQS queue {queue_url} does not answer: {exc}") from exc
            time.sleep(1.0)
