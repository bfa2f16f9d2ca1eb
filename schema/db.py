"""Database engine construction and schema migration (Alembic, run programmatically)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import ArgumentError, OperationalError

from capworks.schema.errors import CapworksError, Code, Unreachable

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x6361_7077_6B73  # "capwks": the advisory lock key migrations serialize on


def normalise_database_url(url: str) -> str:
    """`postgres://` (as hosting panels print it) and a driverless `postgresql://` as the
    psycopg 3 URL capworks installs; SQLAlchemy alone would refuse the first and look for
    psycopg2 with the second."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def connect(url: str) -> Engine:
    """Build an engine for any SQLAlchemy URL and bring its schema to the newest migration."""
    try:
        engine = create_engine(normalise_database_url(url), pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise CapworksError(Code.DATABASE_UNAVAILABLE, f"bad database URL {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        migrate(engine)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise Unreachable(
            Code.DATABASE_UNAVAILABLE, f"cannot reach database {engine.url!r}: {reason}"
        ) from exc
    return engine


def database_now(bind: Engine | Connection) -> datetime:
    """The database's clock, timezone-aware UTC: every host compares stored times with the same
    clock (PostgreSQL's `now()`; on a connection, inside its transaction when it has one). SQLite
    is a file on the one host that uses it: its clock is that host's."""
    if bind.dialect.name != "postgresql":
        return datetime.now(UTC)
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return database_now(conn)
    now = bind.scalar(text("SELECT now()"))
    return now.astimezone(UTC) if isinstance(now, datetime) else datetime.now(UTC)


def migrate(engine: Engine, target: str = "head", *, down: bool = False) -> None:
    """Upgrade `engine`'s schema to the `target` migration (default: the newest), or downgrade."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Worker processes starting together each migrate: without one lock, two create the
            # same table at once and one fails on pg_type's unique index. Held to commit.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, target)


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    # WAL lets readers (a results table, a dashboard) run while a worker writes.
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
