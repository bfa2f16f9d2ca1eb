"""S3 Inventory in (`capworks enqueue s3-inventory://bucket/path/manifest.json`, or a local copy):
a real inventory layout (manifest.json, CSV.gz or Parquet files) in SeaweedFS or on disk, read
with the inventory's ETags and sizes, filtered like a crawl, resumed by file and row with every
object published once; ORC and broken manifests refused in one line."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import s3_client
from pipeline_support import REDIS_URL, Pipeline, own_queue, queued_images

from capworks.checkpoints.layout import configuration_json
from capworks.producer.crawl import Filters, Publisher, run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.inventory import iter_inventory
from capworks.producer.inventory_eta import inventory_rows
from capworks.producer.sources import InputError
from capworks.schema.db import connect
from capworks.schema.jobs import Job
from capworks.schema.settings import Settings

IDENTITY = ("m", "r", "h")
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"
PREFIX = "inv/photos/daily"  # destination-prefix/source-bucket/config-ID, as AWS writes it
NAMES = ["plain", "with space", "plus+sign", "ünïcödé", "deep/er/path"]


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[Pipeline]:
    with own_queue(f"sqlite:///{tmp_path / 'capworks.db'}", tmp_path) as p:
        yield p


def objects(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Inventory rows of `count` current objects in bucket `photos`, each with its MD5 as ETag."""
    rows = []
    for n in range(offset, offset + count):
        body = f"image {n}".encode()
        rows.append(
            {
                "bucket": "photos",
                "key": f"{NAMES[n % len(NAMES)]} {n:04d}.png",
                "version_id": "",
                "is_latest": True,
                "is_delete_marker": False,
                "size": len(body),
                "last_modified_date": "2026-12-01T10:00:00.000Z",
                "e_tag": hashlib.md5(body, usedforsecurity=False).hexdigest(),
            }
        )
    return rows


def not_current() -> list[dict[str, Any]]:
    """Rows a crawl must not caption: a delete marker, an old version, a folder marker."""
    base = objects(1, 900)[0]
    return [
        {**base, "key": "deleted.png", "is_delete_marker": True, "size": "", "e_tag": ""},
        {**base, "key": "old.png", "version_id": "v1", "is_latest": False},
        {**base, "key": "folder/"},
    ]


def csv_gz(rows: list[dict[str, Any]]) -> bytes:
    """An inventory CSV.gz: no header, keys URL-encoded, columns in CSV_SCHEMA's order."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL)
    for r in rows:
        flags = [str(r["is_latest"]).lower(), str(r["is_delete_marker"]).lower()]
        key = quote_plus(r["key"], safe="/")
        writer.writerow(
            [r["bucket"], key, r["version_id"], *flags, r["size"], r["last_modified_date"]]
            + [r["e_tag"]]
        )
    return gzip.compress(text.getvalue().encode())


def parquet(rows: list[dict[str, Any]], row_group_rows: int) -> bytes:
    """An inventory Parquet file with AWS's column names, in small row groups."""
    table = pa.Table.from_pylist(
        [{**r, "size": r["size"] or None, "last_modified_date": None} for r in rows]
    )
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=row_group_rows)
    return out.getvalue()


def manifest(file_format: str, files: list[tuple[str, bytes]]) -> bytes:
    schema = CSV_SCHEMA if file_format == "CSV" else "message s3.inventory { ... }"
    return json.dumps(
        {
            "sourceBucket": "photos",
            "destinationBucket": "arn:aws:s3:::inventory",
            "version": "2016-11-30",
            "creationTimestamp": "1764892800000",
            "fileFormat": file_format,
            "fileSchema": schema,
            "files": [
                {"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()}  # noqa: S324
                for key, body in files
            ],
        }
    ).encode()


def data_files(bodies: list[bytes], suffix: str) -> list[tuple[str, bytes]]:
    return [(f"{PREFIX}/data/{uuid.uuid4()}{suffix}", body) for body in bodies]


def local_inventory(root: Path, file_format: str, files: list[tuple[str, bytes]]) -> Path:
    """A local copy as `aws s3 sync` leaves it: <config>/<time>/manifest.json, <config>/data/."""
    config = root / "photos" / "daily"
    for key, body in files:
        target = config / "data" / Path(key).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    path = config / "2026-12-05T00-00Z" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest(file_format, files))
    return path


class CrashingPublisher(Publisher):
    """A publisher whose process dies (raises `Crash`) before its `crash_at`-th publish."""

    def __init__(self, inner: Publisher, crash_at: int) -> None:
        super().__init__(lambda body: None, inner.redis, inner._queue, inner._job_images)
        self._inner, self._left = inner, crash_at

    def publish(self, job: Job) -> None:
        self._left -= 1
        if self._left <= 0:
            raise Crash
        self._inner.publish(job)


class Crash(Exception):
    pass


def crawl(p: Pipeline, source: str, s3: Any = None, crash_at: int = 0, **options: Any) -> Any:
    publisher = make_publisher(Settings(broker_url=REDIS_URL, queue_name=p.queue, job_images=4))
    return run_crawl(
        source,
        crawl_id="inv",
        db=connect(p.db_url),
        publisher=CrashingPublisher(publisher, crash_at) if crash_at else publisher,
        s3_client=s3,
        identity=IDENTITY,
        job_images=4,
        **options,
    )


def queued_entries(p: Pipeline) -> dict[str, tuple[str | None, int | None]]:
    """URI -> (ETag, size) of every image in the queue, read without consuming it."""
    entries = {}
    for raw in p.redis().lrange(p.queue, 0, -1):
        [[body], *_] = json.loads(base64.b64decode(json.loads(raw)["body"]))
        entries.update({uri: (etag, size) for uri, etag, size, _ in body["images"]})
    return entries


def expected(rows: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    return {f"s3://photos/{r['key']}": (r["e_tag"], r["size"]) for r in rows}


def test_a_csv_inventory_in_a_bucket_is_enqueued_with_its_etags_and_sizes_and_filtered(
    local: Pipeline, s3_endpoint: str
) -> None:
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="inventory")  # type: ignore[attr-defined]
    first, second = objects(7), objects(6, offset=7)
    text = {**first[0], "key": "notes.txt"}
    files = data_files([csv_gz(first + not_current()), csv_gz([text, *second])], ".csv.gz")
    for key, body in files:
        s3.put_object(Bucket="inventory", Key=key, Body=body)  # type: ignore[attr-defined]
    manifest_key = f"{PREFIX}/2026-12-05T00-00Z/manifest.json"
    s3.put_object(Bucket="inventory", Key=manifest_key, Body=manifest("CSV", files))  # type: ignore[attr-defined]

    source = f"s3-inventory://inventory/{manifest_key}"
    stats = crawl(local, source, s3, filters=Filters(frozenset({".png"})))

    assert queued_entries(local) == expected(first + second)
    assert (stats.listed, stats.skipped, stats.enqueued) == (14, 1, 13)


def test_a_local_parquet_inventory_cut_off_mid_file_resumes_by_file_and_row_once_each(
    local: Pipeline, tmp_path: Path
) -> None:
    rows = [objects(20, offset=20 * n) for n in range(3)]
    files = data_files([parquet(r, row_group_rows=6) for r in rows], ".parquet")
    path = local_inventory(tmp_path / "download", "Parquet", files)

    # 60 rows, pages of 9 -> jobs of 4, 4, 1; the run dies before its 9th job (the third page).
    with pytest.raises(Crash):
        crawl(local, str(path), crash_at=9, page_size=9)
    assert 0 < len(queued_images(local)) < 60
    stats = crawl(local, str(path), page_size=9)

    queued = Counter(queued_images(local))
    assert set(queued) == set(expected([r for file in rows for r in file]))
    assert set(queued.values()) == {1}
    # The cut-off page (0:19 to 1:7) had its missing job published, then file 1 went on at row 8.
    assert stats.resumed_from == "1:7" and stats.enqueued == 60


def test_an_inventory_position_skips_the_files_and_rows_before_it(tmp_path: Path) -> None:
    rows = [objects(10, offset=10 * n) for n in range(3)]
    files = data_files([parquet(r, row_group_rows=3) for r in rows], ".parquet")
    path = local_inventory(tmp_path, "Parquet", files)
    resumed = list(iter_inventory(str(path), None, "1:7"))
    assert [position for position, _ in resumed][:4] == ["1:8", "1:9", "1:10", "2:1"]
    assert [ref.key for _, ref in resumed] == [r["key"] for r in rows[1][7:] + rows[2]]


def test_a_row_that_does_not_match_the_schema_is_named_in_one_error(tmp_path: Path) -> None:
    body = csv_gz(objects(2)) + gzip.compress(b'"photos","short.png"\n')
    path = local_inventory(tmp_path, "CSV", data_files([body], ".csv.gz"))
    with pytest.raises(InputError, match=r"row 3: 2 columns, the manifest's fileSchema names 8"):
        list(iter_inventory(str(path), None, None))


def producer_model(where: Path) -> Path:
    """A producer host's model folder: configuration.json and the weights' recorded hash."""
    where.mkdir()
    (where / "configuration.json").write_text(json.dumps(configuration_json(64)))
    (where / "weights.sha256").write_text(f"{'0' * 64}  pytorch_model.bin\n")
    return where


@pytest.mark.parametrize(
    ("file_format", "files", "message"),
    [
        ("ORC", [], "ORC inventories are not read; configure CSV or Parquet"),
        ("CSV", [("inv/missing.csv.gz", b"")], "inventory file inv/missing.csv.gz is not beside"),
    ],
)
def test_an_orc_or_incomplete_local_inventory_is_refused_in_one_line(
    local: Pipeline, tmp_path: Path, file_format: str, files: list[tuple[str, bytes]], message: str
) -> None:
    path = tmp_path / "inv" / "manifest.json"
    path.parent.mkdir()
    path.write_bytes(manifest(file_format, files))
    model = producer_model(tmp_path / "model")
    result = local.cli("enqueue", str(path), "--model", str(model), "--no-progress")
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if "error" in line]  # no traceback
    assert line.startswith("capworks: error: ") and message in line, result.stderr


def put_inventory(s3: Any, file_format: str, files: list[tuple[str, bytes]], doc: bytes) -> str:
    """The inventory's files and manifest in a bucket of its own; returns its source."""
    bucket = f"inventory-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for key, body in files:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    manifest_key = f"{PREFIX}/2026-12-05T00-00Z/manifest.json"
    doc = doc.replace(b"arn:aws:s3:::inventory", f"arn:aws:s3:::{bucket}".encode())
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=doc)
    return f"s3-inventory://{bucket}/{manifest_key}"


def test_a_data_file_whose_md5_differs_from_the_manifest_is_refused_before_its_rows(
    local: Pipeline, s3_endpoint: str
) -> None:
    first, second = objects(5), objects(5, offset=5)
    files = data_files([csv_gz(first), csv_gz(second)], ".csv.gz")
    doc = manifest("CSV", files)
    # The second file changed after the manifest was written (a partial copy, another run's).
    files[1] = (files[1][0], csv_gz(second + objects(1, offset=10)))
    source = put_inventory(s3_client(s3_endpoint), "CSV", files, doc)

    with pytest.raises(InputError, match=r"inventory file .*\.csv\.gz: MD5 [0-9a-f]{32} is not"):
        crawl(local, source, s3_client(s3_endpoint), page_size=5)
    assert queued_entries(local) == expected(first)  # no row of the changed file went out


def test_a_parquet_file_whose_columns_differ_from_the_file_schema_is_refused(
    tmp_path: Path,
) -> None:
    schema = (
        "message s3.inventory { required binary bucket (STRING); required binary key (STRING);"
        " optional int64 size; optional binary e_tag (STRING);}"
    )
    files = data_files([parquet(objects(3), row_group_rows=3)], ".parquet")
    path = local_inventory(tmp_path, "Parquet", files)
    path.write_bytes(path.read_bytes().replace(b"message s3.inventory { ... }", schema.encode()))
    with pytest.raises(InputError, match=r"columns .* are not the manifest's fileSchema"):
        list(iter_inventory(str(path), None, None))


def test_an_inventorys_row_count_for_the_eta_comes_from_its_manifest_and_files(
    tmp_path: Path, s3_endpoint: str
) -> None:
    csv_files = data_files([csv_gz(objects(13)), csv_gz(objects(9, offset=13))], ".csv.gz")
    source = put_inventory(s3_client(s3_endpoint), "CSV", csv_files, manifest("CSV", csv_files))
    assert inventory_rows(source, s3_client(s3_endpoint)) == 22
    pq_files = data_files([parquet(objects(7), 3), parquet(objects(4), 3)], ".parquet")
    assert inventory_rows(str(local_inventory(tmp_path, "Parquet", pq_files)), None) == 11
    source = put_inventory(
        s3_client(s3_endpoint), "Parquet", pq_files, manifest("Parquet", pq_files)
    )
    assert inventory_rows(source, s3_client(s3_endpoint)) == 11  # from the footers' ranges


def old_versions() -> list[dict[str, Any]]:
    """Rows of a versioned bucket that are no current object: a delete marker, an old version."""
    return not_current()[:2]


def test_an_inventorys_eta_leaves_out_delete_markers_and_older_versions(
    tmp_path: Path, s3_endpoint: str
) -> None:
    s3 = s3_client(s3_endpoint)
    first, second = objects(5) + old_versions(), old_versions() + objects(4, offset=5)
    csv_files = data_files([csv_gz(first), csv_gz(second)], ".csv.gz")
    source = put_inventory(s3, "CSV", csv_files, manifest("CSV", csv_files))
    assert inventory_rows(source, s3) == 9
    pq_files = data_files([parquet(first, 3), parquet(second, 3)], ".parquet")
    source = put_inventory(s3, "Parquet", pq_files, manifest("Parquet", pq_files))
    assert inventory_rows(source, s3) == 9  # the flag columns read by ranged GETs
    assert inventory_rows(str(local_inventory(tmp_path, "Parquet", pq_files)), None) == 9


def test_enqueue_sizes_its_progress_bar_by_the_inventorys_current_objects(
    local: Pipeline, tmp_path: Path
) -> None:
    files = data_files([parquet(objects(6) + old_versions(), 3)], ".parquet")
    path = local_inventory(tmp_path / "download", "Parquet", files)
    model = producer_model(tmp_path / "model")
    local.extra_env["COLUMNS"] = "400"  # the bar's last frame whole on a stderr that is no tty
    result = local.cli("enqueue", str(path), "--model", str(model))
    assert result.returncode == 0, result.stderr
    assert "listed 6, skipped 0, enqueued 6" in result.stdout
    # 6 of 6 at the end (8 rows counted would stop it at 75%; no size, at no percentage).
    [bar] = [line for line in result.stderr.splitlines() if "manifest.json" in line]
    assert " 100% ETA" in bar, result.stderr
