"""Results are upserted: writing the same outcomes twice adds no rows, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from capworks.schema.checkpoint import CheckpointConfig, GenerationSettings
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError, Code, ImageError, StorageError
from capworks.schema.tables import BadMessage, Caption, Failure, Image
from capworks.schema.tags import derive_tags
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Alternative, CaptionedImage
from capworks.workers.engine import Caption as EngineCaption
from capworks.workers.outcome import Outcome
from capworks.workers.persist import DatabaseUnavailable, ResultWriter

CONFIG = CheckpointConfig(model_dir=Path("."), model_id="m", revision="r1")


def captioned(text: str, *alts: str) -> CaptionedImage:
    return CaptionedImage(
        EngineCaption(
            text,
            -0.5,
            tuple(Alternative(a, -1.0) for a in alts),
            (1, 2, 3),
            tuple(derive_tags([(text, -0.5), *((a, -1.0) for a in alts)])),
        ),
        64,
        48,
    )


def outcomes() -> list[Outcome]:
    return [
        Outcome(
            ImageRef(
                "s3://b/a red+cat é.jpg",
                bucket="b",
                key="a red+cat é.jpg",
                etag="e1",
                size_bytes=10,
            ),
            captioned("a red cat", "a red dog"),
        ),
        Outcome(ImageRef("/data/x.png"), captioned("two dogs running", "a dog running")),
        Outcome(ImageRef("/data/bad.jpg"), ImageError(Code.TRUNCATED, "image file is truncated")),
        Outcome(ImageRef("s3://b/gone.jpg"), StorageError(Code.NOT_FOUND, "no such object")),
    ]


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        found = {
            t.__tablename__: conn.scalar(select(func.count()).select_from(t))  # type: ignore[misc]
            for t in (Image, Caption, Failure)
        }
        found["tags"] = sum(len(tags) for tags in conn.scalars(select(Caption.tags)))
    return found


@pytest.fixture()
def db(any_db_url: str) -> Engine:
    return connect(any_db_url)


def test_writing_the_same_outcomes_twice_adds_no_rows(db: Engine) -> None:
    writer = ResultWriter(db, CONFIG)
    assert writer.save(outcomes()).captioned == 2
    first = counts(db)
    writer.save(outcomes())
    assert counts(db) == first == {"images": 4, "captions": 2, "tags": 6, "failures": 2}


def test_failures_keep_code_and_count_attempts(db: Engine) -> None:
    writer = ResultWriter(db, CONFIG)
    writer.save(outcomes())
    writer.save(outcomes()[2:3])
    with db.connect() as conn:
        rows = dict(conn.execute(select(Image.uri, Failure.attempts).join(Failure)).all())
        codes = set(conn.scalars(select(Failure.code)))
    assert rows == {"/data/bad.jpg": 2, "s3://b/gone.jpg": 1}
    assert codes == {"truncated", "not_found"}


def test_a_captioned_retry_clears_the_failure_and_keeps_storage_identity(db: Engine) -> None:
    writer = ResultWriter(db, CONFIG)
    writer.save(outcomes())
    writer.save([Outcome(ImageRef("/data/bad.jpg"), captioned("a bird"))])
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Failure)) == 1
        row = conn.execute(select(Image).where(Image.key == "a red+cat é.jpg")).one()
    assert (row.bucket, row.etag, row.width_px, row.height_px) == ("b", "e1", 64, 48)


def test_other_generation_settings_make_a_second_caption(db: Engine) -> None:
    ResultWriter(db, CONFIG).save(outcomes())
    other = CheckpointConfig(
        model_dir=Path("."), model_id="m", revision="r1", generation=GenerationSettings(beam_size=3)
    )
    ResultWriter(db, other).save(outcomes())
    assert counts(db)["captions"] == 4


def test_tags_are_scored_lemmas(db: Engine) -> None:
    ResultWriter(db, CONFIG).save(outcomes())
    with db.connect() as conn:
        tags = conn.scalar(select(Caption.tags).join(Image).where(Image.uri == "/data/x.png"))
    # "two" is in the caption (beam score -0.5) alone, not its alternative (-1.0).
    assert tags == {"dog": 1.0, "run": 1.0, "two": round(1 / (1 + math.exp(-0.5)), 6)}


def test_a_new_caption_replaces_the_tags_of_the_old_one(db: Engine) -> None:
    writer = ResultWriter(db, CONFIG)
    writer.save(outcomes())
    writer.save([Outcome(ImageRef("/data/x.png"), captioned("a cat sleeping"))])
    with db.connect() as conn:
        tags = conn.scalar(select(Caption.tags).join(Image).where(Image.uri == "/data/x.png"))
    assert tags == {"cat": 1.0, "sleep": 1.0}


def test_an_image_listed_twice_in_one_write_keeps_its_last_outcome(db: Engine) -> None:
    ref = ImageRef("/data/twice.png")
    bad = Outcome(ref, ImageError(Code.TRUNCATED, "image file is truncated"))
    saved = ResultWriter(db, CONFIG).save([bad, Outcome(ref, captioned("a dog"))])
    assert (saved.captioned, saved.failed) == (1, 0)
    assert counts(db) == {"images": 1, "captions": 1, "tags": 1, "failures": 0}


@pytest.mark.parametrize(
    "uri",
    ["s3://b/" + "k" * 3000, "/photos/caf\udce9.png", "/photos/a\x00b.png"],
    ids=["over-the-column", "not-utf8", "nul"],
)
def test_an_outcome_the_database_cannot_store_fails_alone(db: Engine, uri: str) -> None:
    bad = Outcome(ImageRef(uri), captioned("a red cat"))
    saved = ResultWriter(db, CONFIG).save([*outcomes(), bad], job_id="job-7")
    if db.dialect.name == "sqlite" and "\udce9" not in uri:
        assert (saved.captioned, saved.failed) == (3, 2)  # SQLite takes long text and NUL
        return
    assert (saved.captioned, saved.failed) == (2, 3)
    assert counts(db) == {"images": 4, "captions": 2, "tags": 6, "failures": 2}
    with db.connect() as conn:
        kept = conn.execute(select(BadMessage.job_key, BadMessage.reason, BadMessage.body)).all()
    assert len(kept) == 1 and kept[0].job_key == "job-7"
    assert "cannot store this image's caption" in kept[0].reason
    assert "photos" in kept[0].body or "kkkk" in kept[0].body


def test_a_write_without_etag_or_size_keeps_the_stored_ones(db: Engine) -> None:
    writer = ResultWriter(db, CONFIG)
    listed = ImageRef("s3://b/p.jpg", bucket="b", key="p.jpg", etag="e1", size_bytes=77)
    writer.save([Outcome(listed, StorageError(Code.STORAGE_UNAVAILABLE, "down"))])
    # `dlq replay` and `enqueue()` send a bare URI: the row keeps what the listing said.
    writer.save([Outcome(ImageRef("s3://b/p.jpg"), captioned("a dog"))])
    with db.connect() as conn:
        row = conn.execute(select(Image).where(Image.uri == "s3://b/p.jpg")).one()
    assert (row.bucket, row.key, row.etag, row.size_bytes) == ("b", "p.jpg", "e1", 77)
    writer.save([Outcome(ImageRef("s3://b/p.jpg", etag="e2", size_bytes=5), captioned("a dog"))])
    with db.connect() as conn:
        row = conn.execute(select(Image).where(Image.uri == "s3://b/p.jpg")).one()
    assert (row.etag, row.size_bytes) == ("e2", 5)  # a new version is recorded


def test_an_unreachable_database_is_reported_as_unavailable_not_as_bad_data() -> None:
    from sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(DatabaseUnavailable) as info:
        ResultWriter(engine, CONFIG).save(outcomes())
    assert info.value.code is Code.DATABASE_UNAVAILABLE and "127.0.0.1" in info.value.message


# Dead letters know their model: only a caption by the same identity clears one.

OTHER = CheckpointConfig(model_dir=Path("."), model_id="m-next", revision="r2")
TRUNCATED = ImageError(Code.TRUNCATED, "image file is truncated")


def letters(db: Engine) -> list[tuple[str, str, str, str, int]]:
    """(uri, model id, revision, code, attempts) of every dead letter."""
    with db.connect() as conn:
        rows = conn.execute(
            select(Image.uri, Failure.model_id, Failure.revision, Failure.code, Failure.attempts)
            .join(Failure)
            .order_by(Failure.model_id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_a_caption_by_another_model_leaves_the_dead_letter_of_this_one(db: Engine) -> None:
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/bad.jpg"), TRUNCATED)])
    ResultWriter(db, OTHER).save([Outcome(ImageRef("/data/bad.jpg"), captioned("a bird"))])
    assert letters(db) == [("/data/bad.jpg", "m", "r1", "truncated", 1)]
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/bad.jpg"), captioned("a bird"))])
    assert letters(db) == []


def test_each_model_keeps_its_own_dead_letter_of_an_image(db: Engine) -> None:
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/bad.jpg"), TRUNCATED)])
    ResultWriter(db, OTHER).save([Outcome(ImageRef("/data/bad.jpg"), TRUNCATED)])
    ResultWriter(db, OTHER).save([Outcome(ImageRef("/data/bad.jpg"), TRUNCATED)])
    assert letters(db) == [
        ("/data/bad.jpg", "m", "r1", "truncated", 1),
        ("/data/bad.jpg", "m-next", "r2", "truncated", 2),
    ]


def test_a_letter_written_for_another_model_names_that_model(db: Engine) -> None:
    # A worker dead-letters a job made for another identity (wrong_model) under the job's.
    wanted = ("m-next", "r2", OTHER.generation.digest())
    wrong = CapworksError(Code.WRONG_MODEL, "job is for m-next")
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/x.png"), wrong)], model=wanted)
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/x.png"), captioned("a cat"))])
    with db.connect() as conn:
        row = conn.execute(select(Failure.model_id, Failure.revision, Failure.settings_hash)).one()
    assert tuple(row) == wanted


def test_a_letter_written_before_letters_knew_their_model_is_cleared_by_any_caption(
    db: Engine,
) -> None:
    ResultWriter(db, CONFIG).save([Outcome(ImageRef("/data/bad.jpg"), TRUNCATED)])
    with db.begin() as conn:  # as revision 0006 leaves a letter written before it
        conn.execute(update(Failure).values(model_id="", revision="", settings_hash=""))
    ResultWriter(db, OTHER).save([Outcome(ImageRef("/data/bad.jpg"), captioned("a bird"))])
    assert letters(db) == []
