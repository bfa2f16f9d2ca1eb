"""Tables in (`capworks enqueue TABLE --url-col url [--id-col key] [--keep-cols a,b]`): CSV,
TSV, JSON lines and Parquet, local or in SeaweedFS, read a batch at a time; malformed rows kept
in `bad_messages` while the rest is enqueued; the id and kept columns land in `images`; a crawl
cut off resumes by row with every row published once."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import s3_client
from pipeline_support import REDIS_URL, Pipeline, own_queue, query, queued_images
from sqlalchemy import select
from test_inventory import Crash, CrashingPublisher, producer_model

from capworks.producer.crawl import run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.sources import InputError
from capworks.producer.tables import TableRef, TableSpec, iter_table
from capworks.schema.db import connect
from capworks.schema.settings import Settings
from capworks.schema.tables import BadMessage, Image, utcnow

IDENTITY = ("m", "r", "h")
SPEC = TableSpec("url", "key", ("caption", "width"))
CSV = (
    "url,key,caption,width\n"
    "s3://b/000.jpg,000,a red square,64\n"
    's3://b/001.jpg,001,"a blue, square",32\n'
    "s3://b/002.jpg,002,too many cells,1,extra\n"
    ",003,no url,8\n"
    "https://host/004.png,004,a green one,16\n"
)


@pytest.fixture()
def local(any_db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with own_queue(any_db_url, tmp_path) as p:
        yield p


def crawl(
    p: Pipeline,
    source: str,
    spec: TableSpec = SPEC,
    s3: Any = None,
    crash_at: int = 0,
    page_size: int = 2,
) -> Any:
    publisher = make_publisher(Settings(broker_url=REDIS_URL, queue_name=p.queue, job_images=2))
    return run_crawl(
        source,
        crawl_id="tbl",
        db=connect(p.db_url),
        publisher=CrashingPublisher(publisher, crash_at) if crash_at else publisher,
        s3_client=s3,
        identity=IDENTITY,
        job_images=2,
        page_size=page_size,
        table=spec,
    )


def parquet_bytes(rows: list[dict[str, Any]], row_group_rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=row_group_rows)
    return bytes(sink.getvalue().to_pybytes())


def rows_of(path: Path, spec: TableSpec = SPEC, start_after: str | None = None) -> list[Any]:
    return [
        (pos, ref.uri, ref.source_id, ref.extra_json, ref.problem)  # type: ignore[attr-defined]
        for pos, ref in iter_table(str(path), None, start_after, spec)
    ]


def test_a_csv_gives_each_row_its_url_id_and_kept_columns_and_names_malformed_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    assert rows_of(path) == [
        ("1", "s3://b/000.jpg", "000", '{"caption": "a red square", "width": "64"}', None),
        ("2", "s3://b/001.jpg", "001", '{"caption": "a blue, square", "width": "32"}', None),
        (
            "3",
            "s3://b/002.jpg,002,too many cells,1,extra",
            None,
            None,
            "row has 5 cells; the header has 4",
        ),
        ("4", ",003,no url,8", None, None, "no URL in column 'url'"),
        ("5", "https://host/004.png", "004", '{"caption": "a green one", "width": "16"}', None),
    ]
    (_, ref), *_ = iter_table(str(path), None, None, SPEC)
    assert (ref.bucket, ref.key) == ("b", "000.jpg")
    assert [r[0] for r in rows_of(path, start_after="3")] == ["4", "5"]


def test_tsv_jsonl_and_parquet_read_the_same_rows(tmp_path: Path) -> None:
    rows = [
        {"url": f"s3://b/{i}.jpg", "key": i, "caption": f"c {i}", "width": i * 8} for i in range(7)
    ]
    (tmp_path / "t.tsv").write_text(
        "url\tkey\tcaption\twidth\n"
        + "".join(f"{r['url']}\t{r['key']}\t{r['caption']}\t{r['width']}\n" for r in rows)
    )
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.parquet").write_bytes(parquet_bytes(rows, row_group_rows=3))
    for name in ("t.tsv", "t.jsonl", "t.parquet"):
        got = rows_of(tmp_path / name)
        assert [(pos, uri, sid) for pos, uri, sid, _, _ in got] == [
            (str(i + 1), f"s3://b/{i}.jpg", str(i)) for i in range(7)
        ], name
        # Resumed after row 4: the Parquet file's first row group (rows 1-3) is not read.
        assert [pos for pos, *_ in rows_of(tmp_path / name, start_after="4")] == ["5", "6", "7"]
    kept = json.loads(rows_of(tmp_path / "t.parquet")[2][3])
    assert kept == {"caption": "c 2", "width": 16}  # Parquet keeps its types


def test_json_lines_that_are_not_objects_are_named_and_the_rest_read(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"url": "s3://b/a.jpg"}\nnot json\n[1, 2]\n{"url": 7}\n{"url": "s3://b/z.jpg"}\n'
    )
    got = rows_of(path, TableSpec("url"))
    assert [(pos, problem) for pos, _, _, _, problem in got] == [
        ("1", None),
        ("2", "not JSON: Expecting value: line 1 column 1 (char 0)"),
        ("3", "not a JSON object"),
        ("4", "no URL in column 'url'"),
        ("5", None),
    ]


def test_a_table_without_the_named_column_is_refused_naming_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("uri,caption\ns3://b/a.jpg,x\n")
    with pytest.raises(InputError, match=r"has no column 'url' \(its columns: uri, caption\)"):
        list(iter_table(str(path), None, None, TableSpec("url")))
    with pytest.raises(InputError, match="a table is .csv"):
        list(iter_table(str(tmp_path / "t.xlsx"), None, None, TableSpec("url")))


def test_a_crawl_of_a_table_enqueues_good_rows_keeps_bad_ones_and_stores_kept_columns(
    local: Pipeline, tmp_path: Path
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    stats = crawl(local, str(path))
    assert sorted(queued_images(local)) == [
        "https://host/004.png",
        "s3://b/000.jpg",
        "s3://b/001.jpg",
    ]
    assert (stats.listed, stats.skipped, stats.enqueued) == (5, 2, 3)
    bad = query(
        local.db_url, lambda c: sorted(c.execute(select(BadMessage.reason, BadMessage.body)).all())
    )
    assert [tuple(b) for b in bad] == [
        ("no URL in column 'url'", ",003,no url,8"),
        ("row has 5 cells; the header has 4", "s3://b/002.jpg,002,too many cells,1,extra"),
    ]
    images = query(
        local.db_url,
        lambda c: c.execute(
            select(Image.uri, Image.bucket, Image.key, Image.source_id, Image.extra).order_by(
                Image.uri
            )
        ).all(),
    )
    assert [tuple(i) for i in images] == [
        ("https://host/004.png", None, None, "004", {"caption": "a green one", "width": "16"}),
        ("s3://b/000.jpg", "b", "000.jpg", "000", {"caption": "a red square", "width": "64"}),
        ("s3://b/001.jpg", "b", "001.jpg", "001", {"caption": "a blue, square", "width": "32"}),
    ]


def test_a_table_crawl_cut_off_resumes_by_row_and_publishes_every_row_once(
    local: Pipeline, tmp_path: Path
) -> None:
    rows = [{"url": f"s3://b/{i:02d}.jpg"} for i in range(11)]
    path = tmp_path / "t.parquet"
    path.write_bytes(parquet_bytes(rows, row_group_rows=4))
    with pytest.raises(Crash):
        crawl(local, str(path), TableSpec("url"), crash_at=4)  # dies publishing its 4th job
    stats = crawl(local, str(path), TableSpec("url"))
    published = Counter(queued_images(local))
    assert published == Counter(r["url"] for r in rows)  # each once
    assert stats.enqueued == 11 and stats.resumed_from is not None


def test_a_table_in_a_bucket_is_read_through_s3(
    local: Pipeline, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = s3_client(s3_endpoint)
    bucket = f"tables-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    s3.put_object(Bucket=bucket, Key="sets/t.csv", Body=CSV.encode())  # type: ignore[attr-defined]
    rows = [{"url": f"s3://b/{i}.jpg"} for i in range(5)]
    s3.put_object(Bucket=bucket, Key="sets/t.parquet", Body=parquet_bytes(rows, 2))  # type: ignore[attr-defined]
    stats = crawl(local, f"s3://{bucket}/sets/t.csv", s3=s3)
    assert (stats.listed, stats.enqueued) == (5, 3)
    got = [
        ref.uri for _, ref in iter_table(f"s3://{bucket}/sets/t.parquet", s3, "2", TableSpec("url"))
    ]
    assert got == ["s3://b/2.jpg", "s3://b/3.jpg", "s3://b/4.jpg"]


def test_enqueue_reads_a_table_from_the_command_line_and_refuses_bad_options_in_one_line(
    tmp_path: Path,
) -> None:
    with own_queue(f"sqlite:///{tmp_path / 'capworks.db'}", tmp_path) as p:
        model = producer_model(tmp_path / "model")
        path = tmp_path / "t.csv"
        path.write_text(CSV)
        common = ("--model", str(model), "--no-progress")
        done = p.cli("enqueue", str(path), "--url-col", "url", "--id-col", "key", *common)
        assert done.returncode == 0, done.stderr
        assert "listed 5, skipped 2, enqueued 3" in done.stdout
        for args, says in (
            ([str(path), "--id-col", "key"], "give --url-col too"),
            (
                [str(path), "--url-col", "link"],
                "has no column 'link' (its columns: url, key, caption, width)",
            ),
            ([str(tmp_path / "none.csv"), "--url-col", "url"], "cannot read the table"),
        ):
            bad = p.cli("enqueue", *args, *common)
            assert bad.returncode == 1
            [line] = [line for line in bad.stderr.splitlines() if "error" in line]
            assert line.startswith("capworks: error: ") and says in line, bad.stderr


def test_a_table_ref_is_still_an_image_ref_for_jobs() -> None:
    ref = TableRef(uri="s3://b/a.jpg", source_id="1", extra_json="{}")
    from capworks.schema.jobs import Job

    assert Job.new([ref], "c", job_id="j").to_wire()["images"] == [
        ["s3://b/a.jpg", None, None, None]
    ]


def test_a_page_naming_an_image_twice_and_a_table_crawled_again_upsert_its_columns(
    local: Pipeline, tmp_path: Path
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(CSV + "s3://b/000.jpg,000b,the same image again,65\n")
    crawl(local, str(path), page_size=1000)
    read = lambda c: c.execute(  # noqa: E731
        select(Image.id, Image.source_id, Image.extra, Image.first_seen).where(
            Image.uri == "s3://b/000.jpg"
        )
    ).one()
    [(image_id, source_id, extra, first_seen)] = [tuple(query(local.db_url, read))]
    assert (source_id, extra) == ("000b", {"caption": "the same image again", "width": "65"})
    assert abs((utcnow() - first_seen.replace(tzinfo=UTC)).total_seconds()) < 600

    path.write_text(CSV.replace("a red square,64", "a redder square,63"))
    crawl(local, str(path), page_size=1000)
    again = query(local.db_url, read)
    assert tuple(again) == (
        image_id,
        "000",
        {"caption": "a redder square", "width": "63"},
        first_seen,
    )
