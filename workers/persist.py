"""Writing results: bulk, idempotent upserts of images, captions (with their tags) and failures.

Every write is keyed by a natural key (image URI; image + model + revision + settings), so
writing the same results twice leaves the same rows: a re-run or a redelivered job adds nothing.
A dead letter is kept per image and caption identity, like a caption, and only a caption by the
same identity clears it (or a letter written before letters knew their model, identity "").
PostgreSQL and SQLite share the `ON CONFLICT` upsert but not the fast way to send many rows: on
PostgreSQL a whole batch is one statement whose columns arrive as arrays (`unnest`), in binary;
on SQLite, executemany.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, literal, or_, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError

from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.errors import CapworksError, Code
from capworks.schema.redact import redact, redact_uri, stored_text
from capworks.schema.tables import BadMessage, Failure, Image, utcnow
from capworks.schema.tables import Caption as CaptionRow
from capworks.workers.engine import CaptionedImage
from capworks.workers.outcome import Outcome

MAX_BAD_BODY_CHARS = 10_000  # of a bad message kept in `bad_messages`, its length noted when cut
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_IMAGE_FIELDS = (
    "uri",
    "bucket",
    "key",
    "version_id",
    "etag",
    "size_bytes",
    "width_px",
    "height_px",
)
_KEPT_FIELDS = tuple(name for name in _IMAGE_FIELDS if name != "uri")
_IDENTITY_FIELDS = ("model_id", "revision", "settings_hash")
_FAILURE_FIELDS = ("uri", *_IDENTITY_FIELDS, "code", "message", "job_id", "traceback")


@dataclass(frozen=True)
class SaveCounts:
    """How many images of a write were captioned and how many failed."""

    captioned: int
    failed: int


@dataclass(frozen=True)
class _Batch:
    """One write, as plain rows keyed by image URI, in URI order (a stable lock order)."""

    now: datetime
    images: list[dict[str, Any]]
    captions: list[dict[str, Any]]
    failures: list[dict[str, Any]]

    @classmethod
    def of(
        cls,
        outcomes: Sequence[Outcome[CaptionedImage]],
        job_id: str | None,
        trace: str | None,
        model: tuple[str, str, str],
    ) -> _Batch:
        now = utcnow()
        # A presigned URL is stored without its signature (`redact_uri`): the row names the
        # object; the job message alone carries what fetches it.
        last = {redact_uri(o.ref.uri): o for o in outcomes}
        batch = cls(now, [], [], [])
        for uri in sorted(last):
            ref, result = last[uri].ref, last[uri].result
            dims = result if isinstance(result, CaptionedImage) else None
            batch.images.append(
                dict(
                    uri=uri,
                    bucket=ref.bucket,
                    key=ref.key,
                    version_id=ref.version_id,
                    etag=ref.etag,
                    size_bytes=ref.size_bytes,
                    width_px=dims.width_px if dims else None,
                    height_px=dims.height_px if dims else None,
                )
            )
            if isinstance(result, CaptionedImage):
                cap = result.caption
                batch.captions.append(
                    dict(
                        uri=uri,
                        text=cap.text,
                        score=cap.score,
                        alternatives=[{"text": a.text, "score": a.score} for a in cap.alternatives],
                        tags=dict(cap.tags),
                    )
                )
            else:
                batch.failures.append(
                    dict(
                        uri=uri,
                        model_id=model[0],
                        revision=model[1],
                        settings_hash=model[2],
                        code=result.code.value,
                        message=redact(result.message)[:2000],
                        job_id=job_id,
                        traceback=redact(trace) if trace else trace,
                    )
                )
        return batch


class DatabaseUnavailable(CapworksError):
    """The database cannot be reached (refused, dropped, locked): wait and write again."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.DATABASE_UNAVAILABLE, message)


# What a value the database cannot store raises: psycopg refuses NUL and over-long values
# (DataError); lone surrogates fail to encode before anything is sent.
_UNSTORABLE = (DataError, UnicodeEncodeError)


@contextmanager
def _reachable() -> Iterator[None]:
    """Turn the driver's connection failures into `DatabaseUnavailable`."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise DatabaseUnavailable(_first_line(exc)) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailable(_first_line(exc)) from exc
        raise


def _first_line(exc: DBAPIError) -> str:
    text = str(exc.orig if exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


Identity = tuple[str, str, str]  # model id, revision, generation settings hash


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
        self._identity: Identity = config.identity

    def save(
        self,
        outcomes: Sequence[Outcome[CaptionedImage]],
        job_id: str | None = None,
        trace: str | None = None,
        model: Identity | None = None,
    ) -> SaveCounts:
        """Upsert all outcomes in one transaction; failures remember the job, a traceback and
        the caption identity they were meant for: `model` (a job made for another identity,
        `wrong_model`), else this writer's.

        An image listed twice is written once, with its last outcome. An outcome the database
        cannot store (a value too long for its column, text that is not UTF-8) is kept in
        `bad_messages` instead, and the rest are written: the batch is halved until the bad one
        stands alone. A database that cannot be reached raises `DatabaseUnavailable`.
        """
        try:
            return self._save_batch(outcomes, job_id, trace, model or self._identity)
        except _UNSTORABLE as exc:
            if len(outcomes) == 1:
                self._save_unstorable(outcomes[0], job_id, exc)
                return SaveCounts(0, 1)
            half = len(outcomes) // 2
            first = self.save(outcomes[:half], job_id, trace, model)
            second = self.save(outcomes[half:], job_id, trace, model)
            return SaveCounts(first.captioned + second.captioned, first.failed + second.failed)

    def _save_batch(
        self,
        outcomes: Sequence[Outcome[CaptionedImage]],
        job_id: str | None,
        trace: str | None,
        model: Identity,
    ) -> SaveCounts:
        batch = _Batch.of(outcomes, job_id, trace, model)
        if not batch.images:
            return SaveCounts(0, 0)
        with _reachable(), self._engine.begin() as conn:
            if self._engine.dialect.name == "postgresql":
                self._save_postgres(conn, batch)
            else:
                self._save_portable(conn, batch)
        return SaveCounts(len(batch.captions), len(batch.failures))

    def _save_unstorable(
        self, outcome: Outcome[CaptionedImage], job_id: str | None, exc: Exception
    ) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "caption" if isinstance(outcome.result, CaptionedImage) else "failure"
        error = CapworksError(
            Code.MALFORMED_MESSAGE, f"the database cannot store this image's {what}: {reason}"
        )
        self.save_message_failure(job_id or outcome.ref.uri, error, outcome.ref)

    def save_message_failure(self, job_key: str, error: CapworksError, body: object) -> None:
        """Keep a message (or one image entry) that failed validation, with the reason."""
        with _reachable(), self._engine.begin() as conn:
            conn.execute(
                # Cut before redacting: a 100 MiB message cost 8 s of regexes and ~600 MiB.
                self._insert(BadMessage).values(
                    job_key=stored_text(job_key, 256)[:256],
                    reason=stored_text(error.message),
                    body=stored_text(repr(body), MAX_BAD_BODY_CHARS),
                    received=utcnow(),
                )
            )

    def _save_postgres(self, conn: Connection, batch: _Batch) -> None:
        """The whole batch in one round trip: every column travels as one array parameter."""
        images, captions, failures = batch.images, batch.captions, batch.failures
        params: dict[str, Any] = {
            "model_id": self._model_id,
            "revision": self._revision,
            "settings_hash": self._settings_hash,
            "settings": json.dumps(self._settings),
            **{f"i_{name}": [row[name] for row in images] for name in _IMAGE_FIELDS},
            "c_uri": [row["uri"] for row in captions],
            "c_text": [row["text"] for row in captions],
            "c_score": [row["score"] for row in captions],
            "c_alternatives": [json.dumps(row["alternatives"]) for row in captions],
            "c_tags": [json.dumps(row["tags"]) for row in captions],
            **{f"f_{name}": [row[name] for row in failures] for name in _FAILURE_FIELDS},
        }
        conn.exec_driver_sql(_POSTGRES_SAVE, params)

    def _save_portable(self, conn: Connection, batch: _Batch) -> None:
        ids = self._upsert_images(conn, batch)
        self._upsert_captions(conn, ids, batch)
        self._upsert_failures(conn, ids, batch)

    def _upsert_images(self, conn: Connection, batch: _Batch) -> dict[str, int]:
        stmt = self._insert(Image)
        update = {"updated_at": stmt.excluded.updated_at}
        # Keep what is known when a write does not say: dimensions when a fetch failed, the
        # storage identity when a job carried none (`dlq replay`, `enqueue()` from a hook).
        for c in _KEPT_FIELDS:
            update[c] = func.coalesce(stmt.excluded[c], Image.__table__.c[c])
        rows = [dict(row, first_seen=batch.now, updated_at=batch.now) for row in batch.images]
        # RETURNING makes SQLAlchemy send the rows as batched multi-row statements
        # ("insertmanyvalues") instead of one statement per row, and hands back the ids.
        found = conn.execute(
            stmt.on_conflict_do_update(index_elements=["uri"], set_=update).returning(
                Image.uri, Image.id, sort_by_parameter_order=True
            ),
            rows,
        )
        return {uri: image_id for uri, image_id in found}

    def _upsert_captions(self, conn: Connection, ids: dict[str, int], batch: _Batch) -> None:
        if not batch.captions:
            return
        rows = [
            dict(
                image_id=ids[row["uri"]],
                model_id=self._model_id,
                revision=self._revision,
                settings_hash=self._settings_hash,
                settings=self._settings,
                text=row["text"],
                score=row["score"],
                created=batch.now,
                alternatives=row["alternatives"],
                tags=row["tags"],
            )
            for row in batch.captions
        ]
        stmt = self._insert(CaptionRow)
        key = ["image_id", "model_id", "revision", "settings_hash"]
        upsert = stmt.on_conflict_do_update(
            index_elements=key,
            set_={
                c: stmt.excluded[c]
                for c in ("text", "score", "alternatives", "settings", "created", "tags")
            },
        )
        conn.execute(upsert, rows)
        # A captioned image is no longer a failure of this identity (nor one of unknown identity).
        conn.execute(
            delete(Failure).where(
                Failure.image_id.in_([r["image_id"] for r in rows]),
                or_(
                    tuple_(Failure.model_id, Failure.revision, Failure.settings_hash)
                    == tuple_(*(literal(v) for v in self._identity)),
                    Failure.model_id == "",
                ),
            )
        )

    def _upsert_failures(self, conn: Connection, ids: dict[str, int], batch: _Batch) -> None:
        if not batch.failures:
            return
        rows = [
            dict(
                {k: v for k, v in row.items() if k != "uri"},
                image_id=ids[row["uri"]],
                attempts=1,
                first_seen=batch.now,
                last_seen=batch.now,
                replays=0,
            )
            for row in batch.failures
        ]
        stmt = self._insert(Failure)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["image_id", *_IDENTITY_FIELDS],
                set_={
                    "code": stmt.excluded.code,
                    "message": stmt.excluded.message,
                    "last_seen": stmt.excluded.last_seen,
                    "job_id": stmt.excluded.job_id,
                    "traceback": stmt.excluded.traceback,
                    "attempts": Failure.__table__.c.attempts + 1,
                },
            ),
            rows,
        )


# The same upserts as the portable path, as one statement (data-modifying WITH clauses). Times
# are the database's clock (`now()`), so `dlq --older-than` compares rows written by hosts
# whose clocks disagree on one clock.
_POSTGRES_SAVE = """
WITH img AS (
    INSERT INTO images (uri, bucket, key, version_id, etag, size_bytes, width_px, height_px,
                        first_seen, updated_at)
    SELECT u.*, now(), now()
    FROM unnest(%(i_uri)b::text[], %(i_bucket)b::text[], %(i_key)b::text[],
                %(i_version_id)b::text[], %(i_etag)b::text[], %(i_size_bytes)b::bigint[],
                %(i_width_px)b::integer[], %(i_height_px)b::integer[]) AS u
    ON CONFLICT (uri) DO UPDATE SET
        bucket = coalesce(excluded.bucket, images.bucket),
        key = coalesce(excluded.key, images.key),
        version_id = coalesce(excluded.version_id, images.version_id),
        etag = coalesce(excluded.etag, images.etag),
        size_bytes = coalesce(excluded.size_bytes, images.size_bytes),
        updated_at = excluded.updated_at,
        width_px = coalesce(excluded.width_px, images.width_px),
        height_px = coalesce(excluded.height_px, images.height_px)
    RETURNING id, uri
), cap AS (
    INSERT INTO captions (image_id, model_id, revision, settings_hash, settings, text, score,
                          alternatives, tags, created)
    SELECT img.id, %(model_id)s, %(revision)s, %(settings_hash)s, %(settings)s::json,
           c.text, c.score, c.alternatives::json, c.tags::jsonb, now()
    FROM unnest(%(c_uri)b::text[], %(c_text)b::text[], %(c_score)b::float8[],
                %(c_alternatives)b::text[], %(c_tags)b::text[])
         AS c (uri, text, score, alternatives, tags)
    JOIN img USING (uri)
    ORDER BY img.id
    ON CONFLICT (image_id, model_id, revision, settings_hash) DO UPDATE SET
        text = excluded.text, score = excluded.score, alternatives = excluded.alternatives,
        tags = excluded.tags, settings = excluded.settings, created = excluded.created
    RETURNING image_id
), cleared AS (
    DELETE FROM failures USING cap WHERE failures.image_id = cap.image_id
        AND ((failures.model_id, failures.revision, failures.settings_hash)
             = (%(model_id)s, %(revision)s, %(settings_hash)s) OR failures.model_id = '')
)
INSERT INTO failures (image_id, model_id, revision, settings_hash, code, message, attempts,
                      first_seen, last_seen, job_id, traceback, replays)
SELECT img.id, f.model_id, f.revision, f.settings_hash, f.code, f.message, 1, now(), now(),
       f.job_id, f.traceback, 0
FROM unnest(%(f_uri)b::text[], %(f_model_id)b::text[], %(f_revision)b::text[],
            %(f_settings_hash)b::text[], %(f_code)b::text[], %(f_message)b::text[],
            %(f_job_id)b::text[], %(f_traceback)b::text[])
     AS f (uri, model_id, revision, settings_hash, code, message, job_id, traceback)
JOIN img USING (uri)
ORDER BY img.id
ON CONFLICT (image_id, model_id, revision, settings_hash) DO UPDATE SET
    code = excluded.code, message = excluded.message, last_seen = excluded.last_seen,
    job_id = excluded.job_id, traceback = excluded.traceback,
    attempts = failures.attempts + 1
"""
