"""Database tables (SQLAlchemy 2 typed ORM), created by the Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so that Alembic migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base sharing one MetaData with the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Image(Base):
    """One image, identified by its URI, with its storage identity and dimensions."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    bucket: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str | None] = mapped_column(String(1024))
    version_id: Mapped[str | None] = mapped_column(String(255))
    etag: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    width_px: Mapped[int | None] = mapped_column(Integer)
    height_px: Mapped[int | None] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # From a table enqueued with `--id-col` / `--keep-cols` (migration 0008): the dataset's own
    # key of the image and the columns kept beside it, for exports to hand back.
    source_id: Mapped[str | None] = mapped_column(String(1024))
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Caption(Base):
    """The best caption of one image by one model, revision and set of generation settings."""

    __tablename__ = "captions"
    __table_args__ = (UniqueConstraint("image_id", "model_id", "revision", "settings_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(512))
    # "" rather than NULL so that the unique constraint holds on every backend.
    revision: Mapped[str] = mapped_column(String(255), default="")
    settings_hash: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    alternatives: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # Content-word lemmas scored by the probability (softmax of beam scores) of the hypotheses
    # that contain them, best first (schema/tags.py, migration 0007):
    # {"dog": 1.0, "beach": 0.6}. JSONB with a GIN index on PostgreSQL (tags ? 'dog').
    tags: Mapped[dict[str, float]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"), default=dict
    )
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Failure(Base):
    """An image that could not be captioned by one caption identity, with a code and the reason.

    Only a caption by the same identity clears it; `model_id` "" is a letter written before
    failures knew their model (any caption clears it).
    """

    __tablename__ = "failures"
    __table_args__ = (UniqueConstraint("image_id", "model_id", "revision", "settings_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(String(512), default="", server_default="")
    revision: Mapped[str] = mapped_column(String(255), default="", server_default="")
    settings_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    code: Mapped[str] = mapped_column(String(64), index=True)
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    job_id: Mapped[str | None] = mapped_column(String(128))
    traceback: Mapped[str | None] = mapped_column(Text)
    replays: Mapped[int] = mapped_column(Integer, default=0)
    last_replayed: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The job of the last replay, recorded before it is published (`capworks dlq replay`).
    replay_job: Mapped[str | None] = mapped_column(String(128))


class BadMessage(Base):
    """A queue message that failed validation: kept for inspection, never retried."""

    __tablename__ = "bad_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_key: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    received: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Export(Base):
    """A named incremental export (`capworks export --mark NAME`): captions up to `high_water`
    (their `created`) were written by earlier runs."""

    __tablename__ = "exports"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    high_water: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Crawl(Base):
    """A resumable listing of a source: where it got to and what it did."""

    __tablename__ = "crawls"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # running, done
    last_key: Mapped[str | None] = mapped_column(Text)
    pending_job: Mapped[str | None] = mapped_column(Text)
    listed: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    enqueued: Mapped[int] = mapped_column(BigInteger, default=0)
    jobs: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
