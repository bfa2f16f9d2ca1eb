"""`capworks events --source sqs` whose first delete kills the process: jobs published, the SQS
messages not deleted, as when the consumer is killed between the two (which cannot be timed
from outside). Everything else is the production command."""

from __future__ import annotations

import os
import sys

from capworks.cli import main
from capworks.producer.events.sqs import SqsConsumer


def crash(self: SqsConsumer, messages: list[object]) -> None:
    if messages:
        os._exit(137)  # like SIGKILL: no cleanup, nothing deleted


SqsConsumer._delete = crash  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
