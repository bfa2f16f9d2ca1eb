"""S3 Inventory as a crawl source: the objects named by an inventory's `manifest.json` (on S3 as
`s3-inventory://bucket/key`, or a local copy), read from its CSV.gz or Parquet files without
listing the bucket, which is how AWS recommends handling billions of objects.

Rows are taken in manifest order, each with the position `<file number>:<row number>`, so a
crawl resumes by file and row: files before the position are not opened, and a Parquet file's
row groups before it are not read. Each file is checked against the manifest before any of its
rows is handed out: its bytes against `files[].MD5checksum`, a Parquet file's columns against
`fileSchema` (a CSV file's rows are checked against it one by one). Delete markers and
versions that are not the latest are skipped; each row's ETag, size and modification time go
into its reference, so the crawl's filters and its "already captioned" check work as they do
for a listing. `producer/inventory_eta.py` sizes the progress bar's ETA.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote_plus

from capworks.producer.sources import InputError, s3_body, s3_stream
from capworks.schema.uris import ImageRef, s3_uri

SCHEME = "s3-inventory://"
# The manifest's column names, normalised (CSV says `ETag`, Parquet `e_tag`): lower case, no `_`.
_COLUMNS = ("bucket", "key", "size", "etag", "lastmodifieddate", "islatest", "isdeletemarker")
_VERSION = "versionid"
FALSE = (False, "false", "False", "FALSE")  # an `IsLatest` that is not
# A Parquet fileSchema's fields: "message s3.inventory { required binary bucket (UTF8); ... }".
_PARQUET_FIELD = re.compile(r"(?:required|optional|repeated)\s+\w+\s+(\w+)")


@dataclass(frozen=True)
class DataFile:
    """One inventory file as the manifest names it."""

    key: str
    size_bytes: int | None
    md5: str | None = None  # hex, from `MD5checksum`


@dataclass(frozen=True)
class Manifest:
    """What a crawl needs of an inventory's `manifest.json`."""

    file_format: str  # "CSV" or "Parquet"
    columns: tuple[str, ...]  # normalised names of fileSchema, in the CSV files' column order
    destination_bucket: str | None
    files: tuple[DataFile, ...]


def is_inventory(source: str) -> bool:
    """True for `s3-inventory://bucket/key` and for a local file named like `manifest.json`."""
    return source.startswith(SCHEME) or (
        "://" not in source and not source.startswith("@") and source.endswith("manifest.json")
    )


def normalise(column: str) -> str:
    """A column name as both formats can be compared: `ETag`, `e_tag` -> `etag`."""
    return column.strip().lower().replace("_", "")


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest's format, columns and files; an `InputError` naming what is wrong."""
    try:
        doc = json.loads(raw)
        file_format = str(doc["fileFormat"])
        schema = str(doc["fileSchema"])
        files = tuple(
            DataFile(
                str(f["key"]),
                int(f["size"]) if f.get("size") is not None else None,
                str(f["MD5checksum"]).lower() if f.get("MD5checksum") else None,
            )
            for f in doc["files"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where} is not an S3 Inventory manifest ({exc})") from exc
    if file_format.upper() == "ORC":
        raise InputError(f"{where}: ORC inventories are not read; configure CSV or Parquet")
    if file_format.upper() not in ("CSV", "PARQUET"):
        raise InputError(f"{where}: unknown inventory fileFormat {file_format!r}")
    columns = _schema_columns(schema)
    if file_format.upper() == "CSV" and not {"bucket", "key"} <= set(columns):
        raise InputError(f"{where}: the fileSchema names no Bucket and Key columns: {schema!r}")
    destination = str(doc.get("destinationBucket") or "").removeprefix("arn:aws:s3:::") or None
    return Manifest(file_format.upper(), columns, destination, files)


def _schema_columns(schema: str) -> tuple[str, ...]:
    """The column names of a fileSchema: a CSV inventory's "Bucket, Key, Size, ...", or a
    Parquet one's message fields (none when it names no field)."""
    if schema.lstrip().startswith("message"):
        return tuple(normalise(name) for name in _PARQUET_FIELD.findall(schema))
    return tuple(normalise(name) for name in schema.split(","))


def parse_position(position: str | None) -> tuple[int, int]:
    """(file number, rows done in it) from a resume position; (0, 0) from the start."""
    if not position:
        return 0, 0
    try:
        file_number, row = position.split(":")
        return int(file_number), int(row)
    except ValueError as exc:
        raise InputError(f"not an inventory position: {position!r}") from exc


def iter_inventory(
    source: str, s3_client: Any | None, start_after: str | None
) -> Iterator[tuple[str, ImageRef]]:
    """(position, reference) of every current object in the inventory, in manifest order."""
    manifest_path = None if source.startswith(SCHEME) else Path(source)
    manifest = parse_manifest(read_manifest(source, manifest_path, s3_client), source)
    start_file, start_row = parse_position(start_after)
    for number, data in enumerate(manifest.files):
        if number < start_file:
            continue
        skip = start_row if number == start_file else 0
        with _opened(source, manifest, manifest_path, data, s3_client) as stream:
            rows = (
                _csv_rows(stream, manifest.columns, data.key)
                if manifest.file_format == "CSV"
                else _parquet_rows(stream, skip, manifest.columns, data.key)
            )
            for row_number, row in rows:
                if row_number <= skip:
                    continue
                ref = row_ref(row)
                if ref is not None:
                    yield f"{number}:{row_number}", ref


def row_ref(row: dict[str, Any]) -> ImageRef | None:
    """The reference of one inventory row; None for a delete marker, an older version or a
    folder marker (a key ending in `/`)."""
    if not is_current(row):
        return None
    bucket, key = str(row["bucket"]), str(row["key"])
    if not key or key.endswith("/"):
        return None
    size = row.get("size")
    etag = row.get("etag")
    return ImageRef(
        uri=s3_uri(bucket, key),
        bucket=bucket,
        key=key,
        version_id=str(row[_VERSION]) if row.get(_VERSION) else None,
        etag=str(etag).strip('"') if etag else None,
        size_bytes=int(size) if size not in (None, "") else None,
        last_modified=_as_utc(row.get("lastmodifieddate")),
    )


def is_current(row: dict[str, Any]) -> bool:
    """False for a delete marker's row and an older version's (rows without the columns are
    current objects)."""
    return not is_true(row.get("isdeletemarker")) and row.get("islatest") not in FALSE


def is_true(value: Any) -> bool:
    """True for an inventory flag that is set (a Parquet boolean, or CSV's `true`)."""
    return value is True or value in ("true", "True", "TRUE")


def _as_utc(value: Any) -> datetime | None:
    """An aware datetime (the crawl's `--modified-since` compares aware times)."""
    if value in (None, ""):
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _csv_rows(stream: IO[bytes], columns: tuple[str, ...], name: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a CSV.gz file; keys arrive URL-encoded and are decoded."""
    text = io.TextIOWrapper(gzip.GzipFile(fileobj=stream), encoding="utf-8", newline="")
    try:
        for number, values in enumerate(csv.reader(text), 1):
            if len(values) != len(columns):
                raise InputError(
                    f"inventory file {name} row {number}: {len(values)} columns, "
                    f"the manifest's fileSchema names {len(columns)}"
                )
            row = dict(zip(columns, values, strict=True))
            row["key"] = unquote_plus(row["key"])
            yield number, row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"inventory file {name} cannot be read: {exc}") from exc


def _parquet_rows(
    stream: IO[bytes], skip: int, schema: tuple[str, ...], name: str
) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a Parquet file, one row group at a time; row groups wholly before
    `skip` are not read. Its columns must be the fileSchema's when that names any."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    names = {normalise(name): name for name in parquet.schema_arrow.names}
    if schema and set(names) != set(schema):
        raise InputError(
            f"inventory file {name}: columns {sorted(names)} are not the manifest's "
            f"fileSchema {sorted(schema)}"
        )
    if not {"bucket", "key"} <= set(names):
        raise InputError(f"inventory Parquet file has no bucket and key columns: {list(names)}")
    wanted = [names[c] for c in (*_COLUMNS, _VERSION) if c in names]
    first = 0
    for group in range(parquet.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if first + count > skip:
            table = parquet.read_row_group(group, columns=wanted)
            columns = {normalise(name): table.column(name).to_pylist() for name in wanted}
            for offset in range(count):
                yield first + offset + 1, {c: values[offset] for c, values in columns.items()}
        first += count


def read_manifest(source: str, path: Path | None, s3_client: Any | None) -> bytes:
    """The manifest's bytes: the local file `path`, else the `s3-inventory://` object."""
    if path is not None:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the manifest {path}: {exc.strerror}") from exc
    bucket, _, key = source.removeprefix(SCHEME).partition("/")
    return s3_body(s3_client, bucket, key, source).read()  # type: ignore[no-any-return]


@contextmanager
def _opened(
    source: str, manifest: Manifest, path: Path | None, data: DataFile, s3_client: Any | None
) -> Iterator[IO[bytes]]:
    """A data file opened for reading, its MD5 checked first when the manifest gives one:
    beside a local manifest when it is there, else from the inventory's destination bucket.
    A file read from S3 is spooled to a temporary file when it is checked or is Parquet (which
    seeks); an unchecked CSV.gz streams."""
    local = local_copy(path, data.key) if path is not None else None
    if local is not None:
        with local.open("rb") as f:
            _check_md5(f, data)
            yield f
        return
    if path is not None and s3_client is None:
        raise InputError(f"inventory file {data.key} is not beside {path} (and S3 is not set up)")
    seekable = manifest.file_format != "CSV" or data.md5 is not None
    with s3_stream(s3_client, data_bucket(source, manifest), data.key, seekable) as stream:
        _check_md5(stream, data)
        yield stream


def data_bucket(source: str, manifest: Manifest) -> str:
    """The bucket the data files are in: the manifest's destination, else the manifest's own."""
    return manifest.destination_bucket or source.removeprefix(SCHEME).partition("/")[0]


def _check_md5(stream: IO[bytes], data: DataFile) -> None:
    """Raise an `InputError` when a seekable file's bytes are not those the manifest names (a
    file rewritten or cut short since); rewind it for reading."""
    if data.md5 is None:
        return
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    if digest.hexdigest() != data.md5:
        raise InputError(
            f"inventory file {data.key}: MD5 {digest.hexdigest()} is not the manifest's "
            f"MD5checksum {data.md5}"
        )
    stream.seek(0)


def local_copy(manifest: Path, key: str) -> Path | None:
    """A data file of a local manifest: its key under one of the manifest's folders, or the
    standard layout (`<config>/<time>/manifest.json` beside `<config>/data/<file>`)."""
    parts = Path(key).parts
    for folder in manifest.resolve().parents[:3]:
        for start in range(len(parts)):
            candidate = folder.joinpath(*parts[start:])
            if candidate.is_file():
                return candidate
    return None
