"""Migrations move existing data: tags rows of revision 0002 become the `tags` column of their
caption in 0003 and come back as rows on downgrade; 0007 recomputes tags weighted by hypothesis
probability; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, create_engine, text

from capworks.schema.db import migrate


@pytest.fixture()
def engine(any_db_url: str) -> Engine:
    return create_engine(any_db_url)


def test_tags_rows_become_a_caption_column_and_back(engine: Engine) -> None:
    migrate(engine, "0002")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO images (id, uri, first_seen, updated_at) "
                "VALUES (1, '/a.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP), "
                "(2, '/b.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO captions (id, image_id, model_id, revision, settings_hash, settings, "
                "text, score, alternatives, created) VALUES "
                "(10, 1, 'm', '', 'h', '{}', 'two dogs running', -0.5, '[]', CURRENT_TIMESTAMP), "
                "(11, 2, 'm', '', 'h', '{}', 'a', -0.5, '[]', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO tags (image_id, caption_id, tag, score) "
                "VALUES (1, 10, 'dog', 1.0), (1, 10, 'two', 0.5)"
            )
        )
    migrate(engine, "0006")  # 0007 recomputes tags from the captions
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, tags FROM captions ORDER BY id")).all()
    tags = {cid: t if isinstance(t, dict) else json.loads(t) for cid, t in rows}
    assert tags == {10: {"dog": 1.0, "two": 0.5}, 11: {}}
    migrate(engine, "0002", down=True)
    with engine.connect() as conn:
        back = conn.execute(text("SELECT image_id, caption_id, tag, score FROM tags")).all()
    assert sorted(back) == [(1, 10, "dog", 1.0), (1, 10, "two", 0.5)]
    engine.dispose()


def _connect(url: str) -> str:
    from capworks.schema.db import connect

    connect(url).dispose()
    return "ok"


def test_processes_migrating_a_new_postgresql_database_at_once_all_succeed(pg_url: str) -> None:
    # Worker processes of a farm start together and each migrates: without the advisory lock
    # one of them died on "duplicate key value violates ... pg_type_typname_nsp_index".
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_connect, [pg_url] * 4) == ["ok"] * 4
    with create_engine(pg_url).connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM captions")) == 0


def test_dead_letters_from_before_0006_survive_with_no_model_and_come_back_one_per_image(
    engine: Engine,
) -> None:
    migrate(engine, "0005")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO images (id, uri, first_seen, updated_at) "
                "VALUES (1, '/a.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO failures (id, image_id, code, message, attempts, first_seen, "
                "last_seen, replays) VALUES (5, 1, 'not_found', 'gone', 2, CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP, 0)"
            )
        )
    migrate(engine)
    letter = "SELECT id, model_id, revision, settings_hash, code, attempts FROM failures"
    with engine.begin() as conn:
        assert conn.execute(text(letter)).all() == [(5, "", "", "", "not_found", 2)]
        # Another model's letter of the same image is a second row now.
        conn.execute(
            text(
                "INSERT INTO failures (id, image_id, model_id, revision, settings_hash, code, "
                "message, attempts, first_seen, last_seen, replays) VALUES (6, 1, 'm', 'r', "
                "'h', 'wrong_model', 'for m', 1, :later, :later, 0)"
            ),
            {"later": datetime.now(UTC) + timedelta(hours=1)},
        )
    migrate(engine, "0005", down=True)
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT id, image_id, code FROM failures")).all()
    assert kept == [(6, 1, "wrong_model")]  # the most recent letter of the image
    engine.dispose()


def stored_tags(engine: Engine) -> dict[int, dict[str, float]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, tags FROM captions ORDER BY id")).all()
    return {cid: t if isinstance(t, dict) else json.loads(t) for cid, t in rows}


def test_tags_of_existing_captions_are_reweighted_by_hypothesis_probability_and_back(
    engine: Engine,
) -> None:
    migrate(engine, "0006")
    alternatives = json.dumps(
        [{"text": "a blue square", "score": -1.0}, {"text": "a green square", "score": -1.2}]
    )
    counted = json.dumps({"square": 1.0, "red": 1 / 3, "blue": 1 / 3, "green": 1 / 3})
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO images (id, uri, first_seen, updated_at) "
                "VALUES (1, '/a.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO captions (id, image_id, model_id, revision, settings_hash, settings, "
                "text, score, alternatives, tags, created) VALUES (10, 1, 'm', '', 'h', '{}', "
                "'a red square', -0.2, :alternatives, :tags, CURRENT_TIMESTAMP)"
            ),
            {"alternatives": alternatives, "tags": counted},
        )
    migrate(engine)
    tags = stored_tags(engine)[10]
    assert tags["square"] == 1.0
    assert tags["red"] > 0.5 > tags["blue"] > tags["green"] > 0
    assert tags["red"] + tags["blue"] + tags["green"] == pytest.approx(1.0, abs=1e-5)
    migrate(engine, "0006", down=True)
    assert stored_tags(engine)[10] == pytest.approx(json.loads(counted), abs=1e-5)
    engine.dispose()
