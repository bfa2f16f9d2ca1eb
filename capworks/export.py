"""Captions out of SQL for data pipelines: the rows an export holds, streamed from the database
in batches (a server-side cursor on PostgreSQL), and the high-water marks of incremental exports.

An incremental export (`--mark NAME`) takes the captions created after its mark and up to a
minute before the database's clock, then moves the mark there: a caption's `created` is its
write transaction's start, so one committed a little after the export read could carry an
earlier time; a minute's settling keeps such rows for the next run instead of losing them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from psycopg.types.json import set_json_loads
from sqlalchemy import Engine, Select, func, select
from sqlalchemy.orm import Session

from capworks.schema.db import database_now
from capworks.schema.tables import Caption, Export, Image, utcnow

BATCH_ROWS = 10_000  # rows fetched per round trip, and per Parquet row group
SETTLE_S = 60.0
MAX_MARK_CHARS = 128

# The columns of every format, in order.
COLUMNS = (
    "uri",
    "bucket",
    "key",
    "etag",
    "source_id",
    "extra",
    "model_id",
    "revision",
    "settings_hash",
    "caption",
    "score",
    "alternatives",
    "tags",
    "created",
)


@dataclass(frozen=True)
class Window:
    """Which captions an export takes: by model, and created after `since` up to `until`."""

    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _select(window: Window, *what: Any) -> Select[Any]:
    stmt = select(*what).join_from(Caption, Image, Caption.image_id == Image.id)
    if window.model is not None:
        stmt = stmt.where(Caption.model_id == window.model)
    if window.since is not None:
        stmt = stmt.where(Caption.created > window.since)
    if window.until is not None:
        stmt = stmt.where(Caption.created <= window.until)
    return stmt


def count_rows(db: Engine, window: Window) -> int:
    """How many captions the window holds (for the progress bar)."""
    with db.connect() as conn:
        return int(conn.scalar(_select(window, func.count())) or 0)


def iter_batches(
    db: Engine, window: Window, batch_rows: int = BATCH_ROWS
) -> Iterator[Sequence[Any]]:
    """The window's rows (`COLUMNS` order) in batches, read through a streaming cursor so that
    memory holds one batch, not the table."""
    stmt = _select(
        window,
        Image.uri,
        Image.bucket,
        Image.key,
        Image.etag,
        Image.source_id,
        Image.extra,
        Caption.model_id,
        Caption.revision,
        Caption.settings_hash,
        Caption.text,
        Caption.score,
        Caption.alternatives,
        Caption.tags,
        Caption.created,
    )
    with db.connect() as conn:
        if conn.dialect.name == "postgresql":
            # psycopg decodes the JSON columns with the json module: over half the export's
            # time on PostgreSQL; orjson's loads takes a quarter of that.
            set_json_loads(orjson.loads, conn.connection.dbapi_connection)  # type: ignore[arg-type]
        result = conn.execution_options(yield_per=batch_rows).execute(stmt)
        yield from result.partitions()


def read_mark(db: Engine, name: str) -> datetime | None:
    """Where the named incremental export got to (None before its first run)."""
    if len(name) > MAX_MARK_CHARS:
        raise ValueError(f"mark name is {len(name)} characters; at most {MAX_MARK_CHARS}")
    with Session(db) as session:
        mark = session.get(Export, name)
        return mark.high_water if mark else None


def settled_until(db: Engine) -> datetime:
    """The newest `created` an incremental export may take now (see the module's docstring)."""
    return database_now(db) - timedelta(seconds=SETTLE_S)


def save_mark(db: Engine, name: str, high_water: datetime, rows: int) -> None:
    """Record that the named export holds everything created up to `high_water`; called only
    once its output is complete, so a failed run leaves the mark where it was."""
    with Session(db) as session:
        mark = session.get(Export, name)
        if mark is None:
            session.add(Export(name=name, high_water=high_water, rows=rows, updated=utcnow()))
        else:
            mark.high_water, mark.rows, mark.updated = high_water, mark.rows + rows, utcnow()
        session.commit()
