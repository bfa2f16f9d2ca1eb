"""How many current objects an S3 Inventory names, for the enqueue progress bar's ETA, read
from the manifest and as little of its files as will say.

A versioned bucket's inventory also lists delete markers and older versions, which a crawl
skips (`inventory.is_current`); counting them would leave the bar short of 100% at the end.
A Parquet file's footer gives its rows, and its `is_latest` / `is_delete_marker` columns
(read alone: on S3 by ranged GETs of those column chunks) say which are current. A CSV.gz
file's count is estimated from the current rows in the first `ETA_SAMPLE_BYTES` of the files
per stored byte (exact when the files are that small).
"""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capworks.producer.inventory import (
    SCHEME,
    DataFile,
    Manifest,
    data_bucket,
    is_current,
    local_copy,
    normalise,
    parse_manifest,
    read_manifest,
)
from capworks.producer.sources import InputError, s3_body
from capworks.schema.errors import StorageError

ETA_SAMPLE_BYTES = 1 << 20  # of CSV.gz files, decompressed to estimate rows per stored byte


def inventory_rows(source: str, s3_client: Any | None) -> int | None:
    """About how many current objects an inventory names (delete markers and older versions
    left out); None when the manifest cannot be read (the crawl then reports why)."""
    manifest_path = None if source.startswith(SCHEME) else Path(source)
    try:
        manifest = parse_manifest(read_manifest(source, manifest_path, s3_client), source)
        if not manifest.files:
            return 0
        if manifest.file_format == "CSV":
            return _estimate_csv_rows(source, manifest, manifest_path, s3_client)
        return sum(
            _parquet_current_rows(source, manifest, manifest_path, d, s3_client)
            for d in manifest.files
        )
    except (InputError, StorageError, OSError, ValueError, pa.ArrowException):
        return None


def _estimate_csv_rows(
    source: str, manifest: Manifest, path: Path | None, s3_client: Any | None
) -> int | None:
    """Current rows of the files read whole within `ETA_SAMPLE_BYTES`, and of the rest by the
    current rows per byte of what was read."""
    budget, rows, read_bytes, unread_bytes = ETA_SAMPLE_BYTES, 0, 0, 0
    for data in manifest.files:
        sample = _head(source, manifest, path, data, s3_client, budget) if budget else b""
        budget -= len(sample)
        rows += csv_current_rows(zlib.decompressobj(wbits=31).decompress(sample), manifest.columns)
        read_bytes += len(sample)
        if len(sample) < (data.size_bytes or 0) or (not sample and data.size_bytes is None):
            if data.size_bytes is None:
                return None
            unread_bytes += data.size_bytes - len(sample)
    if unread_bytes and not rows:
        return None
    return rows + round(unread_bytes * rows / max(read_bytes, 1))


def csv_current_rows(text: bytes, columns: tuple[str, ...]) -> int:
    """The current objects among the whole lines of decompressed CSV inventory text."""
    whole = text[: text.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    if "islatest" not in columns and "isdeletemarker" not in columns:
        return whole.count("\n")
    reader = csv.reader(io.StringIO(whole, newline=""))
    return sum(is_current(dict(zip(columns, values, strict=False))) for values in reader)


def _head(
    source: str,
    manifest: Manifest,
    path: Path | None,
    data: DataFile,
    s3_client: Any | None,
    size_bytes: int,
) -> bytes:
    """The first `size_bytes` of a data file (fewer when it is shorter)."""
    local = local_copy(path, data.key) if path is not None else None
    if local is not None:
        with local.open("rb") as f:
            return f.read(size_bytes)
    where = data_bucket(source, manifest)
    body = s3_body(s3_client, where, data.key, data.key, Range=f"bytes=0-{size_bytes - 1}")
    return bytes(body.read())


def _parquet_current_rows(
    source: str, manifest: Manifest, path: Path | None, data: DataFile, s3_client: Any | None
) -> int:
    """A Parquet file's current objects: its footer's row count less the rows its flag
    columns mark as delete markers or older versions (on S3, ranged reads of those alone)."""
    local = local_copy(path, data.key) if path is not None else None
    if local is not None:
        return parquet_current_rows(pq.ParquetFile(local))
    bucket = data_bucket(source, manifest)
    size = data.size_bytes
    if size is None:
        size = int(s3_client.head_object(Bucket=bucket, Key=data.key)["ContentLength"])  # type: ignore[union-attr]
    return parquet_current_rows(pq.ParquetFile(RangedObject(s3_client, bucket, data.key, size)))


def parquet_current_rows(parquet: pq.ParquetFile) -> int:
    """Rows of the file that are not delete markers nor older versions."""
    names = {normalise(name): name for name in parquet.schema_arrow.names}
    flags = [names[c] for c in ("islatest", "isdeletemarker") if c in names]
    rows = int(parquet.metadata.num_rows)
    if not flags:
        return rows
    table = parquet.read(columns=flags)
    skipped = pa.array([False] * table.num_rows, pa.bool_())
    if "isdeletemarker" in names:
        skipped = pc.or_(skipped, _flag(table.column(names["isdeletemarker"]), "true"))
    if "islatest" in names:
        skipped = pc.or_(skipped, _flag(table.column(names["islatest"]), "false"))
    return rows - int(pc.sum(skipped).as_py() or 0)


def _flag(column: pa.ChunkedArray, value: str) -> pa.ChunkedArray:
    """Where a flag column (boolean, or text) holds `value` ("true"/"false"); never null."""
    if pa.types.is_boolean(column.type):
        held = column if value == "true" else pc.invert(column)
    else:
        held = pc.equal(pc.utf8_lower(column.cast(pa.string())), value)
    return pc.fill_null(held, False)


class RangedObject(io.RawIOBase):
    """An S3 object read by ranged GETs where a reader seeks (pyarrow: a Parquet footer, then
    the column chunks asked for), never downloaded whole."""

    def __init__(self, s3_client: Any, bucket: str, key: str, size_bytes: int) -> None:
        self._s3, self._bucket, self._key = s3_client, bucket, key
        self._size, self._at = size_bytes, 0

    def readable(self) -> bool:
        """Readable."""
        return True

    def seekable(self) -> bool:
        """Seekable."""
        return True

    def tell(self) -> int:
        """Where the next read starts."""
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` from the start, the position now or the end."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` from the position by one ranged GET."""
        want = min(len(buffer), self._size - self._at)
        if want <= 0:
            return 0
        where = f"s3://{self._bucket}/{self._key}"
        body = s3_body(
            self._s3,
            self._bucket,
            self._key,
            where,
            Range=f"bytes={self._at}-{self._at + want - 1}",
        ).read()
        memoryview(buffer)[: len(body)] = body
        self._at += len(body)
        return len(body)
