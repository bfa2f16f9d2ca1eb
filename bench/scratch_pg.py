"""A scratch PostgreSQL database on the local server for one benchmark run, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"


@contextmanager
def scratch_database() -> Iterator[str]:
    """Create a fresh database and yield its URL; drop it (and its connections) at the end."""
    name = f"capworks_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER_URL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
