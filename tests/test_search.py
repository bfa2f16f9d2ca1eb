"""`capworks search`: captions found by words of their text, alternatives and tags, ranked and
filtered, on SQLite (FTS5) and PostgreSQL (tsvector + GIN), with rows written by the real
result writer and the index kept in step by migration 0005."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import run_cli
from sqlalchemy import Engine, create_engine, inspect, text, update

from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect, migrate
from capworks.schema.search import (
    FIELDS,
    Filters,
    SearchQueryError,
    Term,
    parse_fields,
    parse_query,
    search,
)
from capworks.schema.tables import Caption, Image
from capworks.schema.uris import ImageRef, parse_s3
from capworks.workers.engine import Alternative, CaptionedImage
from capworks.workers.engine import Caption as EngineCaption
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

MODEL = CheckpointConfig(model_dir=Path("."), model_id="ofa-a", revision="")
OTHER_MODEL = CheckpointConfig(model_dir=Path("."), model_id="ofa-b", revision="")
# Distractors so that ranking statistics (bm25's document frequencies) mean something.
FILLER = [f"a {c} square on a {b} background" for c in ("red", "green") for b in ("grey", "white")]


def outcome(uri: str, caption: str, alternatives: tuple[str, ...] = (), tags: str = "") -> Outcome:
    where = parse_s3(uri) if uri.startswith("s3://") else None
    engine_caption = EngineCaption(
        caption,
        -0.5,
        tuple(Alternative(a, -1.0) for a in alternatives),
        (1, 2),
        tuple((t, 1.0) for t in tags.split()),
    )
    return Outcome(
        ImageRef(uri, bucket=where and where.bucket, key=where and where.key),
        CaptionedImage(engine_caption, 8, 8),
    )


def write(db: Engine, *outcomes: Outcome, model: CheckpointConfig = MODEL) -> None:
    ResultWriter(db, model).save(list(outcomes))


@pytest.fixture()
def db(any_db_url: str) -> Engine:
    engine = connect(any_db_url)
    write(engine, *(outcome(f"s3://filler/{n}.jpg", t) for n, t in enumerate(FILLER * 3)))
    return engine


def uris(
    db: Engine,
    query: str,
    filters: Filters | None = None,
    limit: int = 20,
    fields: tuple[str, ...] = ("caption",),
) -> list[str]:
    return [hit.uri for hit in search(db, query, filters, limit, fields=fields).hits]  # type: ignore[arg-type]


def test_words_of_caption_alternatives_and_tags_are_found_caption_first(db: Engine) -> None:
    write(
        db,
        outcome("s3://photos/beach/1.jpg", "two dogs running on a beach", tags="dog beach"),
        outcome("s3://photos/park/2.jpg", "a man throwing a ball", ("a man and his dog",)),
        outcome("s3://photos/park/3.jpg", "a man on a bench", tags="puppy"),
    )
    # Stemmed: "dog" finds "dogs"; the caption (and tag) match outranks the alternative's.
    assert uris(db, "dog", fields=FIELDS) == ["s3://photos/beach/1.jpg", "s3://photos/park/2.jpg"]
    assert uris(db, "puppy", fields=FIELDS) == ["s3://photos/park/3.jpg"]
    assert uris(db, "running dogs", fields=FIELDS) == ["s3://photos/beach/1.jpg"]
    # The caption alone by default.
    assert uris(db, "dog") == ["s3://photos/beach/1.jpg"]
    assert uris(db, "puppy") == []
    hits = search(db, "dog", fields=FIELDS).hits
    assert hits[0].rank > hits[1].rank > 0
    assert hits[0].matched == ("caption", "tags") and hits[1].matched == ("alternatives",)
    assert hits[0].caption == "two dogs running on a beach"
    assert hits[0].tags == {"dog": 1.0, "beach": 1.0}


def disagreeing(db: Engine) -> None:
    """Three images whose beam alternatives (and tags) disagree with their captions."""
    write(
        db,
        outcome(
            "s3://d/yellow-on-red.jpg",
            "a yellow square on a red background",
            ("a red square on a yellow background", "a red square on a blue background"),
        ),
        outcome(
            "s3://d/red-on-white.jpg",
            "a red square on a white background",
            ("a red square on a grey background",),
        ),
        outcome(
            "s3://d/black-on-white.jpg",
            "a black square on a white background",
            ("a black square on a red background",),
            tags="black square red",
        ),
    )


ONLY_D = Filters(prefix="s3://d/")


def test_the_caption_alone_is_searched_by_default_and_exclusions_apply_to_it(db: Engine) -> None:
    disagreeing(db)
    # The phrase is in the first image's alternatives only, "red" in the third's.
    assert uris(db, '"red square"', ONLY_D) == ["s3://d/red-on-white.jpg"]
    assert sorted(uris(db, "red background", ONLY_D)) == [
        "s3://d/red-on-white.jpg",
        "s3://d/yellow-on-red.jpg",
    ]
    # A rejected alternative's "blue" does not drop an image whose caption has none.
    assert sorted(uris(db, "red -blue", ONLY_D)) == [
        "s3://d/red-on-white.jpg",
        "s3://d/yellow-on-red.jpg",
    ]
    assert uris(db, "square -white", ONLY_D) == ["s3://d/yellow-on-red.jpg"]
    assert all(hit.matched == ("caption",) for hit in search(db, "square", ONLY_D).hits)


def test_a_caption_match_outranks_any_match_through_alternatives_or_tags(db: Engine) -> None:
    disagreeing(db)
    found = search(db, "red background", ONLY_D, fields=FIELDS).hits
    assert [h.uri for h in found][2] == "s3://d/black-on-white.jpg"
    assert {h.uri: h.matched for h in found} == {
        "s3://d/yellow-on-red.jpg": ("caption", "alternatives"),
        "s3://d/red-on-white.jpg": ("caption", "alternatives"),
        "s3://d/black-on-white.jpg": ("caption", "alternatives", "tags"),
    }
    # A caption holding both words ranks at 1 or more; red only in a rejected alternative and a
    # tag, below 1.
    assert found[1].rank >= 1 > found[2].rank > 0
    phrase = search(db, '"red square"', ONLY_D, fields=("caption", "alternatives")).hits
    assert [h.uri for h in phrase] == ["s3://d/red-on-white.jpg", "s3://d/yellow-on-red.jpg"]
    assert phrase[0].rank >= 1 > phrase[1].rank
    assert phrase[1].matched == ("alternatives",)
    # An exclusion applies to every searched field.
    assert uris(db, "red -blue", ONLY_D, fields=("caption", "alternatives")) == [
        "s3://d/red-on-white.jpg",
        "s3://d/black-on-white.jpg",
    ]
    assert uris(db, "red", ONLY_D, fields=("tags",)) == ["s3://d/black-on-white.jpg"]


def test_fields_are_parsed_from_a_comma_list() -> None:
    assert parse_fields("tags,caption") == ("caption", "tags")
    assert parse_fields(" alternatives ") == ("alternatives",)
    for bad in ("", "captions", "caption,alt"):
        with pytest.raises(SearchQueryError, match="choose from caption,alternatives,tags"):
            parse_fields(bad)


def test_a_phrase_matches_words_in_order_and_a_dash_excludes(db: Engine) -> None:
    write(
        db,
        outcome("s3://p/1.jpg", "a red ball on the grass"),
        outcome("s3://p/2.jpg", "a ball that is red"),
        outcome("s3://p/3.jpg", "a red car"),
    )
    assert uris(db, '"red ball"') == ["s3://p/1.jpg"]
    assert sorted(uris(db, "red ball")) == ["s3://p/1.jpg", "s3://p/2.jpg"]
    assert uris(db, "ball -grass") == ["s3://p/2.jpg"]
    assert sorted(uris(db, 'red -"red ball" -square')) == ["s3://p/2.jpg", "s3://p/3.jpg"]


def test_filters_by_prefix_bucket_model_and_date_and_limit(db: Engine) -> None:
    write(
        db,
        outcome("s3://photos/cats/1.jpg", "a cat on a sofa"),
        outcome("s3://photos/cats_old/2.jpg", "a cat in a box"),
        outcome("s3://archive/cats/3.jpg", "a cat asleep"),
    )
    write(db, outcome("s3://photos/cats/1.jpg", "a cat and a lamp"), model=OTHER_MODEL)
    with db.begin() as conn:  # one caption from last year
        old_id = conn.scalar(text("SELECT id FROM images WHERE uri = 's3://archive/cats/3.jpg'"))
        last_year = datetime.now(UTC) - timedelta(days=365)
        conn.execute(update(Caption).where(Caption.image_id == old_id).values(created=last_year))
    assert len(uris(db, "cat")) == 4
    assert sorted(uris(db, "cat", Filters(prefix="s3://photos/cats/"))) == [
        "s3://photos/cats/1.jpg",
        "s3://photos/cats/1.jpg",
    ]
    assert sorted(uris(db, "cat", Filters(bucket="archive"))) == ["s3://archive/cats/3.jpg"]
    assert [h.caption for h in search(db, "cat", Filters(model="ofa-b")).hits] == [
        "a cat and a lamp"
    ]
    month_ago = datetime.now(UTC) - timedelta(days=30)
    assert uris(db, "cat", Filters(until=month_ago)) == ["s3://archive/cats/3.jpg"]
    assert len(uris(db, "cat", Filters(since=month_ago))) == 3
    assert len(uris(db, "cat", limit=2)) == 2
    # A prefix's LIKE wildcards are literal.
    assert uris(db, "cat", Filters(prefix="s3://photos/cats_")) == ["s3://photos/cats_old/2.jpg"]


def test_only_the_first_matches_are_ranked_past_the_cap_and_it_says_so(db: Engine) -> None:
    write(db, outcome("s3://p/1.jpg", "a red ball"))
    capped = search(db, "red", limit=2, max_ranked=3)
    assert capped.capped and capped.ranked == 4 and len(capped.hits) == 2
    every = search(db, "red", limit=2, max_ranked=None)
    assert not every.capped and every.ranked == 7  # six red squares and the ball
    assert not search(db, "ball", max_ranked=3).capped


def test_a_recaptioned_image_is_found_by_its_new_words_only(db: Engine) -> None:
    write(db, outcome("s3://p/1.jpg", "a yellow taxi"))
    assert uris(db, "taxi") == ["s3://p/1.jpg"]
    write(db, outcome("s3://p/1.jpg", "a yellow bus"))  # the upsert's update path
    assert uris(db, "taxi") == []
    assert uris(db, "bus") == ["s3://p/1.jpg"]
    with db.begin() as conn:  # deleting the image cascades to its caption and the index
        conn.execute(Image.__table__.delete().where(Image.uri == "s3://p/1.jpg"))
    assert uris(db, "bus") == []
    assert uris(db, "yellow") == []


def test_migration_indexes_existing_captions_and_downgrades(any_db_url: str) -> None:
    engine = create_engine(any_db_url)
    migrate(engine, "0004")
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
                '\'an old lighthouse\', -0.5, \'[{"text": "a white tower", "score": -1}]\', '
                "'{\"coast\": 1.0}', CURRENT_TIMESTAMP)"
            )
        )
    migrate(engine, "0005")  # 0007 would recompute the tags from the caption
    for word in ("lighthouse", "tower", "coast"):
        assert uris(engine, word, fields=FIELDS) == ["/a.png"], word
    migrate(engine, "0004", down=True)
    names = inspect(engine)
    assert "search" not in {c["name"] for c in names.get_columns("captions")}
    assert "captions_fts" not in names.get_table_names()
    assert "ix_captions_created" not in {i["name"] for i in names.get_indexes("captions")}
    migrate(engine)
    assert uris(engine, "tower", fields=FIELDS) == ["/a.png"]
    engine.dispose()


def test_query_parsing_keeps_words_phrases_and_exclusions() -> None:
    assert parse_query('dog "red  ball" -cat -"old car"') == [
        Term(("dog",)),
        Term(("red", "ball")),
        Term(("cat",), negated=True),
        Term(("old", "car"), negated=True),
    ]
    # FTS5 and tsquery operators are only words here; a hyphenated word is a phrase.
    assert parse_query('NEAR(a b) OR red-ball "x') == [
        Term(("NEAR", "a")),
        Term(("b",)),
        Term(("OR",)),
        Term(("red", "ball")),
        Term(("x",)),
    ]
    for nothing in ("", "   ", "-dog", '"" !!'):
        with pytest.raises(SearchQueryError):
            parse_query(nothing)


def test_cli_prints_json_lines_and_rejects_an_empty_query_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = connect(url)
    write(db, *(outcome(f"/f/{n}.png", t) for n, t in enumerate(FILLER)))
    write(db, outcome("/p/1.png", "a horse in a field"), outcome("/p/2.png", "a horse and a cart"))
    found = run_cli("search", "horse", "--db", url, "--json", "--prefix", "/p/", "--limit", "5")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert sorted(h["uri"] for h in hits) == ["/p/1.png", "/p/2.png"]
    assert set(hits[0]) >= {"uri", "caption", "rank", "model", "created", "tags"}
    table = run_cli("search", '"horse and"', "--db", url)
    assert table.returncode == 0 and "/p/2.png" in table.stdout and "/p/1.png" not in table.stdout
    bad = run_cli("search", "--db", url, "--", "-horse")  # "--": a query may start with -
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "nothing to search for" in bad.stderr
    bad_date = run_cli("search", "horse", "--db", url, "--since", "yesterday")
    assert bad_date.returncode == 2 and bad_date.stderr.count("\n") == 1


def test_cli_searches_the_fields_asked_and_shows_where_each_hit_matched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = connect(url)
    write(db, *(outcome(f"/f/{n}.png", t) for n, t in enumerate(FILLER)))
    write(
        db,
        outcome("/p/cart.png", "a horse and a cart", ("a horse and a blue cart",)),
        outcome("/p/field.png", "a pony in a field", ("a horse in a field",), tags="pony field"),
    )
    # The README's exclusion form: inside the quoted query.
    caption_only = run_cli("search", "horse -blue", "--db", url, "--json")
    assert caption_only.returncode == 0, caption_only.stderr
    hits = [json.loads(line) for line in caption_only.stdout.splitlines()]
    assert [(h["uri"], h["matched"]) for h in hits] == [("/p/cart.png", ["caption"])]
    both = run_cli("search", "horse", "--db", url, "--json", "--in", "alternatives,caption")
    hits = [json.loads(line) for line in both.stdout.splitlines()]
    assert [(h["uri"], h["matched"]) for h in hits] == [
        ("/p/cart.png", ["caption", "alternatives"]),
        ("/p/field.png", ["alternatives"]),
    ]
    assert hits[0]["rank"] >= 1 > hits[1]["rank"]
    table = run_cli("search", "horse", "--db", url, "--in", "caption,alternatives,tags")
    assert table.returncode == 0, table.stderr
    assert "found in" in table.stdout and "alternatives" in table.stdout
    bad = run_cli("search", "horse", "--db", url, "--in", "captions")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "choose from caption,alternatives,tags" in bad.stderr
