"""Writing results: bulk, idempotent upserts of images, captions, tags and failures.

Every write is keyed by a natural key (image URI; image + model + revision + settings; caption +
tag), so writing the same results twice leaves the same rows: a re-run or a redelivered job adds
nothing. PostgreSQL and SQLite have the same `ON CONFLICT` upsert; there is no portable one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from schema.checkpoint import CheckpointConfig
from schema.errors import CapworksError, Code
from schema.tables import BadMessage, Failure, Image, Tag, utcnow
from schema.tables import Caption as CaptionRow
from schema.uris import ImageRef
from workers.engine import CaptionedImage
from workers.tags import derive_tags

_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: a caption, or a failure with a code and a reason."""

    ref: ImageRef
    result: CaptionedImage | CapworksError


@dataclass(frozen=True)
class SaveCounts:
    """How many images of a write were captioned and how many failed."""

    captioned: int
    failed: int


class ResultWriter:
    """Writes outcomes of one model (id, revision, generation settings) to the database."""

    def __init__(self, engine: Engine, config: CheckpointConfig) -> None:
        if engine.dialect.name not in _INSERTS:
            raise CapworksError(
                Code.DATABASE_UNAVAILABLE,
                f"database dialect {engine.dialect.name!r} is not supported; "
                "use PostgreSQL or SQLite",
            )
        self._engine = engine
        self._insert: Any = _INSERTS[engine.dialect.name]
        self._model_id = config.model_id
        self._revision = config.revision
        self._settings = config.generation.to_dict()
        self._settings_hash = config.generation.digest()

    def save(
        self, outcomes: Sequence[Outcome], job_id: str | None = None, trace: str | None = None
    ) -> SaveCounts:
        """Upsert all outcomes in one transaction; failures remember the job and a traceback."""
        if not outcomes:
            return SaveCounts(0, 0)
        with self._engine.begin() as conn:
            ids = self._upsert_images(conn, outcomes)
            done = [o for o in outcomes if isinstance(o.result, CaptionedImage)]
            failed = [o for o in outcomes if isinstance(o.result, CapworksError)]
            self._upsert_captions(conn, ids, done)
            self._upsert_failures(conn, ids, failed, job_id, trace)
        return SaveCounts(len(done), len(failed))

    def save_message_failure(self, job_key: str, error: CapworksError, body: object) -> None:
        """Keep a message that failed validation, with the reason."""
        with self._engine.begin() as conn:
            conn.execute(
                self._insert(BadMessage).values(
                    job_key=job_key[:256],
                    reason=error.message,
                    body=repr(body)[:10000],
                    received=utcnow(),
                )
            )

    def _upsert_images(self, conn: Connection, outcomes: Sequence[Outcome]) -> dict[str, int]:
        now = utcnow()
        rows: dict[str, dict[str, Any]] = {}
        for o in outcomes:
            dims = o.result if isinstance(o.result, CaptionedImage) else None
            rows[o.ref.uri] = dict(
                uri=o.ref.uri,
                bucket=o.ref.bucket,
                key=o.ref.key,
                version_id=o.ref.version_id,
                etag=o.ref.etag,
                size_bytes=o.ref.size_bytes,
                width_px=dims.width_px if dims else None,
                height_px=dims.height_px if dims else None,
                first_seen=now,
                updated_at=now,
            )
        stmt = self._insert(Image)
        update = {
            c: stmt.excluded[c]
            for c in ("bucket", "key", "version_id", "etag", "size_bytes", "updated_at")
        }
        # Keep known dimensions when a failed fetch reports none.
        for c in ("width_px", "height_px"):
            update[c] = _coalesce(stmt.excluded[c], Image.__table__.c[c])
        # RETURNING makes SQLAlchemy send the rows as batched multi-row statements
        # ("insertmanyvalues") instead of one statement per row, and hands back the ids.
        found = conn.execute(
            stmt.on_conflict_do_update(index_elements=["uri"], set_=update).returning(
                Image.uri, Image.id, sort_by_parameter_order=True
            ),
            sorted(rows.values(), key=lambda r: str(r["uri"])),
        )
        return {uri: image_id for uri, image_id in found}

    def _upsert_captions(
        self, conn: Connection, ids: dict[str, int], done: Sequence[Outcome]
    ) -> None:
        if not done:
            return
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for o in done:
            assert isinstance(o.result, CaptionedImage)
            cap = o.result.caption
            rows.append(
                dict(
                    image_id=ids[o.ref.uri],
                    model_id=self._model_id,
                    revision=self._revision,
                    settings_hash=self._settings_hash,
                    settings=self._settings,
                    text=cap.text,
                    score=cap.score,
                    created=now,
                    alternatives=[{"text": a.text, "score": a.score} for a in cap.alternatives],
                )
            )
        stmt = self._insert(CaptionRow)
        key = ["image_id", "model_id", "revision", "settings_hash"]
        upsert = stmt.on_conflict_do_update(
            index_elements=key,
            set_={
                c: stmt.excluded[c]
                for c in ("text", "score", "alternatives", "settings", "created")
            },
        ).returning(CaptionRow.image_id, CaptionRow.id, sort_by_parameter_order=True)
        caption_ids = dict(
            conn.execute(upsert, sorted(rows, key=lambda r: int(r["image_id"]))).tuples().all()
        )
        image_ids = [ids[o.ref.uri] for o in done]
        conn.execute(delete(Tag).where(Tag.caption_id.in_(list(caption_ids.values()))))
        tags = []
        for o in done:
            assert isinstance(o.result, CaptionedImage)
            cap = o.result.caption
            image_id = ids[o.ref.uri]
            for tag, score in derive_tags(cap.text, [a.text for a in cap.alternatives]):
                tags.append(
                    dict(image_id=image_id, caption_id=caption_ids[image_id], tag=tag, score=score)
                )
        if tags:
            conn.execute(self._insert(Tag).returning(Tag.id), tags)  # batched, see above
        # A captioned image is no longer a failure.
        conn.execute(delete(Failure).where(Failure.image_id.in_(image_ids)))

    def _upsert_failures(
        self,
        conn: Connection,
        ids: dict[str, int],
        failed: Sequence[Outcome],
        job_id: str | None,
        trace: str | None,
    ) -> None:
        if not failed:
            return
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for o in failed:
            assert isinstance(o.result, CapworksError)
            rows.append(
                dict(
                    image_id=ids[o.ref.uri],
                    code=o.result.code.value,
                    message=o.result.message[:2000],
                    attempts=1,
                    first_seen=now,
                    last_seen=now,
                    job_id=job_id,
                    traceback=trace,
                    replays=0,
                )
            )
        stmt = self._insert(Failure)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["image_id"],
                set_={
                    "code": stmt.excluded.code,
                    "message": stmt.excluded.message,
                    "last_seen": stmt.excluded.last_seen,
                    "job_id": stmt.excluded.job_id,
                    "traceback": stmt.excluded.traceback,
                    "attempts": Failure.__table__.c.attempts + 1,
                },
            ),
            sorted(rows, key=lambda r: int(r["image_id"])),
        )


def _coalesce(first: Any, second: Any) -> Any:
    from sqlalchemy import func

    return func.coalesce(first, second)
