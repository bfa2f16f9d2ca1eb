"""The files an export writes, one batch of rows at a time: Parquet (a row group a batch),
JSON lines, CSV, and WebDataset-style tar shards of `<key>.txt` captions.

Each writer writes into files it is handed by an `Output` (a local path, or a scratch file for
`s3://`) and gives every finished file back to it, so nothing half-written ever has the
final name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from capworks.export import COLUMNS
from capworks.schema.uris import is_s3, parse_s3

Format = Literal["parquet", "jsonl", "csv", "wds"]
FORMATS: tuple[Format, ...] = ("parquet", "jsonl", "csv", "wds")
SHARD_ROWS = 10_000  # captions per WebDataset shard
_JSON_COLUMNS = frozenset({"extra", "alternatives", "tags"})

PARQUET_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("bucket", pa.string()),
        ("key", pa.string()),
        ("etag", pa.string()),
        ("source_id", pa.string()),
        ("extra", pa.string()),  # the kept columns as a JSON object: their types vary by table
        ("model_id", pa.string()),
        ("revision", pa.string()),
        ("settings_hash", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        (
            "alternatives",
            pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64())])),
        ),
        ("tags", pa.map_(pa.string(), pa.float64())),
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)


class Output:
    """Where an export's files go: a local path (written beside it, renamed when complete) or
    an `s3://bucket/key` (written to a scratch file, uploaded when complete)."""

    def __init__(self, target: str, s3_client: Any | None) -> None:
        if is_s3(target) and s3_client is None:
            raise ValueError(f"{target}: no S3 client configured")
        self.target = target
        self._s3: Any = s3_client
        self._scratch = Path(tempfile.mkdtemp(prefix="capworks-export-"))
        self.written: list[str] = []

    def staging(self, name: str | None = None) -> Path:
        """A file to write `name` (under the target; the target itself when None) into."""
        return self._scratch / (name or "export")

    def publish(self, staged: Path, name: str | None = None) -> None:
        """Give the finished file its final name: renamed locally, or uploaded and removed."""
        if is_s3(self.target):
            loc = parse_s3(self.target)
            key = posixpath.join(loc.key, name) if name else loc.key
            self._s3.upload_file(str(staged), loc.bucket, key)  # multipart beyond 8 MiB
            staged.unlink()
            self.written.append(f"s3://{loc.bucket}/{key}")
            return
        final = Path(self.target) / name if name else Path(self.target)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Moved beside it first (a copy when the scratch folder is another file system), then
        # renamed: the final name appears only on a complete file.
        sibling = final.with_name(f".{final.name}.partial")
        shutil.move(staged, sibling)
        os.replace(sibling, final)
        self.written.append(str(final))

    def close(self) -> None:
        """Remove the scratch folder (and whatever a failed run left in it)."""
        for leftover in self._scratch.iterdir():
            leftover.unlink()
        self._scratch.rmdir()


class Writer(Protocol):
    """One format's writer: batches of rows in `COLUMNS` order in, files to its `Output`."""

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Append a batch of rows."""

    def close(self) -> None:
        """Finish and publish what is written."""


def created_utc(value: datetime) -> datetime:
    """A stored time as aware UTC (SQLite hands back naive UTC times)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_record(row: Sequence[Any]) -> dict[str, Any]:
    """A row as a JSON-able object: the columns by name, `created` in ISO 8601."""
    record = dict(zip(COLUMNS, row, strict=True))
    record["created"] = created_utc(record["created"]).isoformat()
    return record


def rows_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows in `COLUMNS` order as a table of `PARQUET_SCHEMA`."""
    columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)] if rows else []
    if not columns:
        return PARQUET_SCHEMA.empty_table()
    by_name = dict(zip(COLUMNS, columns, strict=True))
    by_name["extra"] = [None if e is None else json.dumps(e) for e in by_name["extra"]]
    by_name["tags"] = [list((t or {}).items()) for t in by_name["tags"]]
    by_name["created"] = [created_utc(c) for c in by_name["created"]]
    return pa.table(by_name, schema=PARQUET_SCHEMA)


class ParquetFile:
    """One Parquet file, a row group per batch."""

    def __init__(self, output: Output) -> None:
        self._output = output
        self._path = output.staging()
        self._writer = pq.ParquetWriter(str(self._path), PARQUET_SCHEMA, compression="zstd")

    def write(self, rows: Sequence[Sequence[Any]] | pa.Table) -> None:
        """Append the batch (rows, or a table of `PARQUET_SCHEMA` as `export_copy` reads them
        from PostgreSQL) as one row group."""
        table = rows if isinstance(rows, pa.Table) else rows_table(rows)
        if table.num_rows:
            self._writer.write_table(table)

    def close(self) -> None:
        """Write the footer and publish the file."""
        self._writer.close()
        self._output.publish(self._path)


class TextFile:
    """JSON lines (one object per caption) or CSV (JSON in the extra, alternatives and tags
    cells), written as the batches come."""

    def __init__(self, output: Output, fmt: Literal["jsonl", "csv"]) -> None:
        self._output = output
        self._path = output.staging()
        self._file: TextIO = self._path.open("w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file) if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(COLUMNS)

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Append the batch."""
        for row in rows:
            record = as_record(row)
            if self._csv is None:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            self._csv.writerow(
                json.dumps(record[c], ensure_ascii=False)
                if c in _JSON_COLUMNS and record[c] is not None
                else record[c]
                for c in COLUMNS
            )

    def close(self) -> None:
        """Flush and publish the file."""
        self._file.close()
        self._output.publish(self._path)


def sample_key(uri: str, key: str | None, source_id: str | None) -> str:
    """The WebDataset key of an image: the dataset's own id when it has one, else its object
    key, path or URL path without the extension, as a relative path with no `.` or `..` parts
    (so extracting a shard writes inside the folder it is extracted into)."""
    if source_id:
        name = source_id
    else:
        if key is not None:
            name = key
        elif uri.startswith(("http://", "https://")):
            parts = urlsplit(uri)
            name = parts.netloc + parts.path
        else:
            name = uri
        stem, ext = posixpath.splitext(name)
        name = stem if ext and "/" not in ext else name
    parts_kept = [p for p in name.split("/") if p not in ("", ".", "..")]
    return "/".join(parts_kept) or "_"


class WdsShards:
    """WebDataset-style tar shards (`shard-000000.tar`, ...) of `<key>.txt` captions, the
    images' own keys, so the shards sit beside a dataset's image shards."""

    def __init__(self, output: Output, shard_rows: int = SHARD_ROWS) -> None:
        self._output = output
        self._shard_rows = shard_rows
        self._number = 0
        self._in_shard = 0
        self._tar: tarfile.TarFile | None = None
        self._name = ""

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add each caption as `<key>.txt`, starting a new shard every `shard_rows`."""
        for row in rows:
            record = dict(zip(COLUMNS, row, strict=True))
            if self._tar is None:
                self._name = f"shard-{self._number:06d}.tar"
                self._tar = tarfile.open(self._output.staging(self._name), "w")
            data = record["caption"].encode("utf-8")
            member = tarfile.TarInfo(
                sample_key(record["uri"], record["key"], record["source_id"]) + ".txt"
            )
            member.size = len(data)
            member.mtime = int(created_utc(record["created"]).timestamp())
            member.mode = 0o644
            self._tar.addfile(member, io.BytesIO(data))
            self._in_shard += 1
            if self._in_shard == self._shard_rows:
                self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._output.publish(self._output.staging(self._name), self._name)
        self._tar, self._in_shard = None, 0
        self._number += 1

    def close(self) -> None:
        """Publish the last, partly filled shard."""
        self._finish_shard()


def make_writer(fmt: Format, output: Output) -> Writer:
    """The writer of one format."""
    if fmt == "parquet":
        return ParquetFile(output)
    if fmt == "wds":
        return WdsShards(output)
    return TextFile(output, fmt)
