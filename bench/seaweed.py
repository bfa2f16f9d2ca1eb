"""A scratch SeaweedFS S3 server on 127.0.0.1 for one benchmark run, stopped afterwards
(`capworks.seaweed`: it also stops by itself if the benchmark is killed)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from capworks.seaweed import SeaweedServer, s3_client

__all__ = ["s3_client", "scratch_s3"]


@contextmanager
def scratch_s3(limit_s: int = 1800) -> Iterator[str]:
    """Start a server in a temporary folder (for at most `limit_s`), yield its S3 endpoint."""
    with tempfile.TemporaryDirectory(prefix="capworks-bench-s3-") as tmp:
        server = SeaweedServer(Path(tmp), limit_s)
        try:
            yield server.start()
        finally:
            server.stop()
