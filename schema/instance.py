"""Which worker process this is: a random instance id, never `<hostname>:<pid>`.

Replicas of a container share a hostname (`docker compose --scale`, `hostNetwork` pods) and
their supervisor is PID 1, so its child has the same small PID in every replica: keys built from
host and pid made twins share one lease and one heartbeat, and one twin's death handed back
the other's live jobs. The supervisor makes an id for each process it starts and passes it in
`CAPWORKS_INSTANCE_ID`; a process started some other way (a plain `celery worker`) makes its own.
"""

from __future__ import annotations

import uuid
from functools import cache

from capworks.schema.settings import get_settings


def new_instance_id() -> str:
    """A fresh id: 16 hex digits, unique across a farm for all practical purposes."""
    return uuid.uuid4().hex[:16]


@cache
def instance_id() -> str:
    """This process's id: the one its supervisor gave it, or one made here, once."""
    return get_settings().instance_id or new_instance_id()
