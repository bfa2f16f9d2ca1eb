"""`capworks export` against both databases: every format holds each caption with its image and
model, `--model` and `--since` pick the window, a mark makes runs incremental without losing a
row written late, WebDataset shards hold `<key>.txt`, and the output can go to S3 (SeaweedFS)."""

from __future__ import annotations

import csv
import json
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, s3_client
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from capworks.cli import main
from capworks.export import Window, iter_batches
from capworks.export_copy import iter_tables
from capworks.export_formats import Output, WdsShards, rows_table, sample_key
from capworks.schema.db import connect
from capworks.schema.tables import Caption, Export, Image

NOW = datetime.now(UTC)
ALTERNATIVES = [{"text": "a red square", "score": -0.5}, {"text": "a square", "score": -0.9}]


def add_caption(
    db_url: str,
    uri: str,
    text: str,
    *,
    model: str = "m1",
    created: datetime = NOW - timedelta(hours=1),
    key: str | None = None,
    source_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    engine = connect(db_url)
    with Session(engine) as session:
        image = session.query(Image).filter_by(uri=uri).one_or_none()
        if image is None:
            image = Image(
                uri=uri,
                bucket="b" if key else None,
                key=key,
                etag="e-" + uri[-5:],
                source_id=source_id,
                extra=extra,
            )
            session.add(image)
            session.flush()
        session.add(
            Caption(
                image_id=image.id,
                model_id=model,
                revision="r",
                settings_hash="h",
                settings={},
                text=text,
                score=-0.25,
                alternatives=ALTERNATIVES,
                tags={"red": 1.0, "square": 0.75},
                created=created,
            )
        )
        session.commit()
    engine.dispose()


@pytest.fixture()
def db(any_db_url: str) -> str:
    add_caption(
        any_db_url,
        "s3://b/photos/001.jpg",
        "a red square on a blue background",
        key="photos/001.jpg",
        source_id="000001",
        extra={"caption": "original text", "width": 640},
    )
    add_caption(any_db_url, "s3://b/photos/002.jpg", "un carré rouge", key="photos/002.jpg")
    add_caption(any_db_url, "https://host/x/003.png", "a green square", model="m2")
    return any_db_url


def export(db_url: str, out: Path | str, *options: str) -> int:
    return main(["export", str(out), "--db", db_url, "--no-progress", *options])


def read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        for row in rows:
            row["tags"] = dict(row["tags"])
            row["created"] = row["created"].isoformat()
        return rows
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in ("extra", "alternatives", "tags"):
            row[column] = json.loads(row[column]) if row[column] else None
        row["score"] = float(row["score"])
        for column in ("bucket", "key", "source_id"):
            row[column] = row[column] or None
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_every_format_holds_each_caption_with_its_image_and_model(
    db: str, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"captions.{fmt}"
    assert export(db, out, "--format", fmt) == 0
    rows = sorted(read_rows(out, fmt), key=lambda r: r["uri"])
    assert [(r["uri"], r["caption"], r["model_id"]) for r in rows] == [
        ("https://host/x/003.png", "a green square", "m2"),
        ("s3://b/photos/001.jpg", "a red square on a blue background", "m1"),
        ("s3://b/photos/002.jpg", "un carré rouge", "m1"),
    ]
    first = rows[1]
    extra = first["extra"] if fmt != "parquet" else json.loads(first["extra"])
    assert extra == {"caption": "original text", "width": 640}
    assert (first["bucket"], first["key"], first["source_id"]) == ("b", "photos/001.jpg", "000001")
    assert (first["etag"], first["revision"], first["settings_hash"]) == ("e-1.jpg", "r", "h")
    assert first["score"] == -0.25
    assert first["alternatives"] == ALTERNATIVES
    assert first["tags"] == {"red": 1.0, "square": 0.75}
    created = datetime.fromisoformat(first["created"])
    assert abs(created - (NOW - timedelta(hours=1))) < timedelta(seconds=1)
    assert not list(tmp_path.glob(".*partial"))  # nothing left beside it


def test_model_and_since_pick_the_window(db: str, tmp_path: Path) -> None:
    add_caption(db, "s3://b/photos/004.jpg", "new", key="photos/004.jpg", created=NOW)
    out = tmp_path / "m1.jsonl"
    since = (NOW - timedelta(minutes=5)).isoformat()
    assert export(db, out, "--format", "jsonl", "--model", "m1", "--since", since) == 0
    assert [r["uri"] for r in read_rows(out, "jsonl")] == ["s3://b/photos/004.jpg"]


def pass_time(db_url: str, delta: timedelta) -> None:
    """As if `delta` had passed: every caption and mark moved that far into the past."""
    engine = connect(db_url)
    with Session(engine) as session:
        for caption in session.scalars(select(Caption)):
            caption.created -= delta
        for mark in session.scalars(select(Export)):
            mark.high_water -= delta
        session.commit()
    engine.dispose()


def test_a_mark_exports_what_came_since_its_last_run_and_keeps_unsettled_rows_for_the_next(
    db: str, tmp_path: Path
) -> None:
    # Written seconds ago: a transaction begun before it may not have committed yet, so the
    # export leaves this second for the next run rather than step over rows still to come.
    add_caption(db, "s3://b/recent.jpg", "recent", created=datetime.now(UTC) - timedelta(seconds=5))
    runs = []
    for n in range(3):
        out = tmp_path / f"{n}.jsonl"
        assert export(db, out, "--format", "jsonl", "--mark", "daily") == 0
        runs.append(sorted(r["uri"] for r in read_rows(out, "jsonl")))
        pass_time(db, timedelta(minutes=10))
    assert runs == [
        ["https://host/x/003.png", "s3://b/photos/001.jpg", "s3://b/photos/002.jpg"],
        ["s3://b/recent.jpg"],
        [],
    ]


def test_rows_stream_in_batches(db: str) -> None:
    engine = connect(db)
    sizes = [len(batch) for batch in iter_batches(engine, Window(), batch_rows=2)]
    engine.dispose()
    assert sizes == [2, 1]


def test_wds_shards_hold_key_txt_captions_under_the_images_keys(db: str, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert export(db, out, "--format", "wds", "--model", "m1") == 0
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = sorted(tar.getnames())
        texts = {n: tar.extractfile(n).read().decode() for n in names}  # type: ignore[union-attr]
    # The dataset's own id where the table gave one, else the object key without extension.
    assert texts == {
        "000001.txt": "a red square on a blue background",
        "photos/002.txt": "un carré rouge",
    }


def test_wds_starts_a_new_shard_every_n_captions(db: str, tmp_path: Path) -> None:
    engine = connect(db)
    output = Output(str(tmp_path / "shards"), None)
    shards = WdsShards(output, shard_rows=2)
    for batch in iter_batches(engine, Window()):
        shards.write(batch)
    shards.close()
    output.close()
    engine.dispose()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_a_sample_key_never_climbs_out_of_the_folder_a_shard_is_extracted_into() -> None:
    assert sample_key("s3://b/../../etc/passwd.jpg", "../../etc/passwd.jpg", None) == "etc/passwd"
    assert sample_key("https://host/a/b.c/x.png?q=1", None, None) == "host/a/b.c/x"
    assert sample_key("/data/img/x.y.jpg", None, None) == "data/img/x.y"
    assert sample_key("s3://b/k", "k", "/../id/./7") == "id/7"


def test_an_export_goes_to_s3_and_bad_targets_are_one_line_errors(
    db: str, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = s3_client(s3_endpoint)
    bucket = f"exports-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    env = {
        "CAPWORKS_S3_ENDPOINT_URL": s3_endpoint,
        "CAPWORKS_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    done = run_cli(
        "export", f"s3://{bucket}/run/captions.parquet", "--db", db, "--no-progress", env=env
    )
    assert done.returncode == 0, done.stderr
    assert "exported 3 captions (parquet)" in done.stdout
    body = s3.get_object(Bucket=bucket, Key="run/captions.parquet")["Body"].read()  # type: ignore[attr-defined]
    (tmp_path / "back.parquet").write_bytes(body)
    assert pq.read_table(tmp_path / "back.parquet").num_rows == 3
    for args, says in (
        (["https://host/out.parquet"], "give a local path or s3://bucket/key"),
        ([str(tmp_path / "w"), "--format", "wds"], "give --model"),
    ):
        bad = run_cli("export", *args, "--db", db, "--no-progress", env=env)
        assert bad.returncode == 1
        assert bad.stderr.count("\n") == 1 and says in bad.stderr, bad.stderr


def test_parquet_tables_read_by_copy_hold_what_the_row_path_gives_whatever_the_text(
    pg_url: str,
) -> None:
    # JSON and COPY both escape: backslashes, quotes, line breaks, tabs, control characters
    # (COPY's own quote and delimiter among them) and non-ASCII must come through unchanged.
    awkward = 'a "quoted" back\\slash\\\\ line\nbreak\ttab \x01\x02 ünï 😀 \\n'
    add_caption(pg_url, "s3://b/odd/1.jpg", awkward, key="odd/1.jpg", extra={"k": awkward})
    add_caption(pg_url, "https://host/2.png", "plain", source_id="id\\2", extra={"n": [1, 2.5]})
    add_caption(pg_url, "/data/3.jpg", "no extra")
    engine = connect(pg_url)
    with Session(engine) as session:
        caption = session.scalars(select(Caption).where(Caption.text == "no extra")).one()
        caption.tags, caption.score, caption.revision = {}, float("-inf"), ""
        caption.alternatives = [{"text": awkward, "score": -1.5}]
        odd = session.scalars(select(Caption).where(Caption.text == awkward)).one()
        odd.tags = {'say ": 1, "x': 0.5, awkward: 1, "}": 0.25}
        session.execute(  # JSON text as another writer may have left it: over several lines
            text("UPDATE captions SET alternatives = :alt WHERE text = 'plain'"),
            {"alt": '[\n  {"text": "two\\nlines",\n   "score": -2}\n]'},
        )
        session.commit()

    copied = list(iter_tables(engine, Window(), batch_rows=2))
    rows = [row for batch in iter_batches(engine, Window()) for row in batch]
    engine.dispose()

    assert [table.num_rows for table in copied] == [2, 1]
    by_uri = sorted(pa.concat_tables(copied).to_pylist(), key=lambda r: r["uri"])
    assert by_uri == sorted(rows_table(rows).to_pylist(), key=lambda r: r["uri"])
    assert [r["caption"] for r in by_uri] == ["no extra", "plain", awkward]
    assert (by_uri[0]["tags"], by_uri[0]["score"], by_uri[0]["revision"]) == ([], float("-inf"), "")
    assert by_uri[1]["alternatives"] == [{"text": "two\nlines", "score": -2.0}]
    assert dict(by_uri[2]["tags"]) == {'say ": 1, "x': 0.5, awkward: 1.0, "}": 0.25}
