"""Tables as a crawl source: `capworks enqueue TABLE --url-col url [--id-col key] [--keep-cols
a,b]` reads the CSV, TSV, JSON lines or Parquet files people already have (an img2dataset
`url,key,caption` list, a dataset manifest), local or on `s3://`, a batch at a time.

Each data row is numbered from 1 and that number is its resume position, so a crawl cut off
goes on from the row after its last page (a Parquet file's row groups before it are not read).
A row that cannot be enqueued (no URL, a CSV row with the wrong number of cells, a JSON line
that is no object) comes out as a `TableRef` with its `problem` set and its own text as URI:
the crawl keeps it in `bad_messages` and goes on with the rest.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy.orm import Session

from capworks.producer.sources import InputError, s3_stream
from capworks.schema.tables import Image, utcnow
from capworks.schema.uris import ImageRef, is_s3, parse_s3

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PARQUET_BATCH_ROWS = 10_000
MAX_SOURCE_ID_CHARS = 1024  # images.source_id
MAX_ROW_TEXT_CHARS = 10_000  # of a bad row kept in bad_messages


@dataclass(frozen=True)
class TableSpec:
    """Which columns of a table name the image, identify it and are kept beside it."""

    url_col: str
    id_col: str | None = None
    keep_cols: tuple[str, ...] = ()

    def columns(self) -> tuple[str, ...]:
        """Every column the crawl reads."""
        named = (self.url_col, *((self.id_col,) if self.id_col else ()), *self.keep_cols)
        return tuple(dict.fromkeys(named))

    @property
    def keeps_columns(self) -> bool:
        """True when rows carry something for the `images` table besides the URL."""
        return bool(self.id_col or self.keep_cols)


@dataclass(frozen=True)
class TableRef(ImageRef):
    """A reference read from a table row, with the row's id and kept columns (JSON text), or
    with `problem` saying why the row is not one (its `uri` is then the row's text)."""

    source_id: str | None = None
    extra_json: str | None = None
    problem: str | None = None


def table_format(source: str) -> str:
    """`csv`, `tsv`, `jsonl` or `parquet`, from the name (a `.gz` after a text format reads
    through gzip); an `InputError` for any other name."""
    name = source.lower().removesuffix(".gz")
    if source.lower().endswith(".parquet"):
        return "parquet"
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise InputError(
        f"{source}: a table is .csv, .tsv, .jsonl, .ndjson (each maybe .gz) or .parquet"
    )


def iter_table(
    source: str, s3_client: Any | None, start_after: str | None, spec: TableSpec
) -> Iterator[tuple[str, ImageRef]]:
    """(row number, reference) of every data row after the row `start_after`."""
    fmt = table_format(source)
    skip = int(start_after or 0)
    with _opened(source, s3_client, fmt == "parquet") as stream:
        rows = (
            _parquet_rows(stream, spec, skip)
            if fmt == "parquet"
            else _text_rows(stream, fmt, source.lower().endswith(".gz"), spec)
        )
        for number, row in rows:
            if number > skip:
                yield str(number), row


def table_rows(source: str) -> int | None:
    """How many rows a table holds when that is free to know (a local Parquet file's footer),
    for the progress bar's ETA; else None."""
    if is_s3(source) or not source.lower().endswith(".parquet"):
        return None
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(source).metadata.num_rows)
    except (OSError, ValueError):
        return None  # the crawl reports an unreadable table with its own error


def row_ref(values: dict[str, Any], spec: TableSpec) -> TableRef | str:
    """The reference of one row (its cells by column name), or why it is none."""
    url = values.get(spec.url_col)
    if not isinstance(url, str) or not url.strip():
        return f"no URL in column {spec.url_col!r}"
    source_id = None
    if spec.id_col:
        raw = values.get(spec.id_col)
        if raw is None or raw == "":
            return f"no id in column {spec.id_col!r}"
        source_id = str(raw)
        if len(source_id) > MAX_SOURCE_ID_CHARS:
            return f"id is {len(source_id)} characters; at most {MAX_SOURCE_ID_CHARS}"
    extra = None
    if spec.keep_cols:
        extra = json.dumps({c: values.get(c) for c in spec.keep_cols}, default=str)
    url = url.strip()
    bucket, key = None, None
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
    return TableRef(
        uri=url, bucket=bucket or None, key=key or None, source_id=source_id, extra_json=extra
    )


def row_problem(ref: ImageRef) -> str | None:
    """Why a table row is no reference (None for a reference, from a table or not)."""
    return ref.problem if isinstance(ref, TableRef) else None


def save_table_columns(session: Session, refs: list[ImageRef]) -> None:
    """Write the id and kept columns of table rows into their `images` rows (created when
    new, in the page's transaction), so exports can give captions back under them.

    One statement a page, below the ORM (whose bulk upsert cost a third of a table crawl's
    rate): PostgreSQL takes the page as one JSON parameter in one round trip (psycopg dumps
    lists to arrays, or binds 1,000 rows' parameters, far slower than orjson dumps them), SQLite
    as one `executemany`; the kept columns go in as the JSON text the row already is."""
    # One row per URI (the last wins): PostgreSQL refuses to upsert a row twice in a statement.
    latest = {
        ref.uri: (ref.uri, ref.bucket, ref.key, ref.source_id, ref.extra_json)
        for ref in refs
        if isinstance(ref, TableRef) and (ref.source_id is not None or ref.extra_json)
    }
    rows = list(latest.values())
    if not rows:
        return
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        page = orjson.dumps([dict(zip("ubkse", row, strict=True)) for row in rows])
        conn.exec_driver_sql(_PG_UPSERT, {"page": page.decode(), "now": utcnow()})
        return
    # SQLite keeps times as text in SQLAlchemy's format: the column type writes the stamp.
    write_stamp = Image.__table__.c.first_seen.type.dialect_impl(conn.dialect).bind_processor(
        conn.dialect
    )
    now = write_stamp(utcnow()) if write_stamp else utcnow()
    conn.exec_driver_sql(_SQLITE_UPSERT, [(*row, now, now) for row in rows])


_PG_UPSERT = """
    INSERT INTO images (uri, bucket, key, source_id, extra, first_seen, updated_at)
    SELECT u, b, k, s, e::json, %(now)s, %(now)s
    FROM json_to_recordset(%(page)s::json) AS page(u text, b text, k text, s text, e text)
    ON CONFLICT (uri) DO UPDATE SET source_id = excluded.source_id, extra = excluded.extra
"""
_SQLITE_UPSERT = """
    INSERT INTO images (uri, bucket, key, source_id, extra, first_seen, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (uri) DO UPDATE SET source_id = excluded.source_id, extra = excluded.extra
"""


def _bad(text: str, problem: str) -> TableRef:
    return TableRef(uri=text[:MAX_ROW_TEXT_CHARS], problem=problem)


def _check_columns(found: list[str], spec: TableSpec, source: str) -> None:
    missing = [c for c in spec.columns() if c not in found]
    if missing:
        shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
        raise InputError(f"{source} has no column {missing[0]!r} (its columns: {shown})")


def _text_rows(
    stream: IO[bytes], fmt: str, gz: bool, spec: TableSpec
) -> Iterator[tuple[int, TableRef]]:
    raw: Any = gzip.GzipFile(fileobj=stream) if gz else stream
    text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
    if fmt == "jsonl":
        yield from _json_rows(text, spec)
    else:
        yield from _csv_rows(text, "\t" if fmt == "tsv" else ",", spec)


def _csv_rows(text: IO[str], delimiter: str, spec: TableSpec) -> Iterator[tuple[int, TableRef]]:
    reader = csv.reader(text, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    _check_columns(header, spec, "the table")
    width = len(header)
    for number, cells in enumerate(reader, 1):
        if len(cells) != width:
            yield (
                number,
                _bad(delimiter.join(cells), f"row has {len(cells)} cells; the header has {width}"),
            )
        else:
            values = dict(zip(header, cells, strict=True))
            ref = row_ref(values, spec)
            yield number, _bad(delimiter.join(cells), ref) if isinstance(ref, str) else ref


def _json_rows(text: IO[str], spec: TableSpec) -> Iterator[tuple[int, TableRef]]:
    number = 0
    for line in text:
        if not line.strip():
            continue
        number += 1
        try:
            values = json.loads(line)
        except ValueError as exc:
            yield number, _bad(line.rstrip("\n"), f"not JSON: {exc}")
            continue
        if not isinstance(values, dict):
            yield number, _bad(line.rstrip("\n"), "not a JSON object")
            continue
        ref = row_ref(values, spec)
        yield number, _bad(line.rstrip("\n"), ref) if isinstance(ref, str) else ref


def _parquet_rows(stream: IO[bytes], spec: TableSpec, skip: int) -> Iterator[tuple[int, TableRef]]:
    """Rows of the needed columns, a batch at a time; row groups wholly at or before `skip`
    are not read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    _check_columns(parquet.schema_arrow.names, spec, "the Parquet table")
    groups, first, number = [], 0, 0
    for group in range(parquet.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if first + count > skip:
            groups.append(group)
        else:
            number = first + count
        first += count
    if not groups:
        return
    batches = parquet.iter_batches(
        PARQUET_BATCH_ROWS, row_groups=groups, columns=list(spec.columns())
    )
    for batch in batches:
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for offset in range(batch.num_rows):
            number += 1
            if number <= skip:
                continue
            values = {name: column[offset] for name, column in columns.items()}
            ref = row_ref(values, spec)  # the row's text is made only for a bad row: it costs
            yield (
                number,
                _bad(json.dumps(values, default=str), ref) if isinstance(ref, str) else ref,
            )


@contextmanager
def _opened(source: str, s3_client: Any | None, seekable: bool) -> Iterator[IO[bytes]]:
    """The table's bytes: a local file, or an S3 object streamed (spooled to a temporary file
    for Parquet, which reads its footer first)."""
    if not is_s3(source):
        try:
            local = Path(source).open("rb")
        except OSError as exc:
            raise InputError(f"cannot read the table {source}: {exc.strerror}") from exc
        with local:
            yield local
        return
    loc = parse_s3(source)
    with s3_stream(s3_client, loc.bucket, loc.key, seekable) as stream:
        yield stream
