"""Walking inputs: local files and folders, `s3://bucket/prefix` listings, http(s) URLs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from capworks.producer.imagenames import IMAGE_SUFFIXES, is_image_name
from capworks.producer.walk import walk_files
from capworks.schema.errors import Code, StorageError
from capworks.schema.uris import ImageRef, file_uri, is_http, is_s3, parse_s3, s3_uri

# The resume position of a local file whose name is not valid UTF-8 (no database column holds
# it): its bytes in hex. Local URIs are absolute paths, so no real URI starts so.
_BYTES_POSITION = "bytes:"


class InputError(ValueError):
    """An input on the command line that does not exist or cannot be listed."""


def iter_refs(inputs: Iterable[str], s3_client: Any | None) -> Iterator[ImageRef]:
    """Every image reference under the given inputs, in a stable order per input; a folder's
    files and a prefix's keys are judged by the image suffix policy (`producer/imagenames.py`)."""
    for item in inputs:
        if is_s3(item):
            if s3_client is None:
                raise InputError(f"{item}: no S3 client configured")
            yield from (ref for ref in iter_s3(item, s3_client) if is_image_name(ref.uri))
        elif is_http(item):
            yield ImageRef(uri=item)
        else:
            yield from iter_local(Path(item))


def local_ref(path: Path) -> ImageRef:
    """A local file's reference; its "ETag" is size and modification time, so an edit shows.
    A file gone since its folder was listed gets a bare reference: its fetch says `not_found`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return ImageRef(uri=file_uri(path))
    return stat_ref(file_uri(path), st)


def stat_ref(uri: str, st: os.stat_result) -> ImageRef:
    """A local file's reference from its stat (`local_ref` without the lookup)."""
    return ImageRef(
        uri=uri,
        etag=f"{st.st_size:x}-{st.st_mtime_ns:x}",
        size_bytes=st.st_size,
        last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
    )


def iter_local(path: Path, start_after: str | None = None) -> Iterator[ImageRef]:
    """A file, or the image files under a folder (by suffix, recursively, in path order)."""
    for _, ref in iter_local_positions(path, start_after):
        yield ref


def iter_local_positions(
    path: Path, start_after: str | None = None, suffixes: frozenset[str] | None = IMAGE_SUFFIXES
) -> Iterator[tuple[str, ImageRef]]:
    """(walked path, reference) of a file, or of the files under a folder named as images by
    `suffixes` (every file for None), streamed as the folder is walked (`producer/walk.py`),
    after the walked path `start_after`."""
    if path.is_file():
        yield file_uri(path), local_ref(path)
    elif path.is_dir():
        for found in walk_files(path, suffixes, start_after):
            yield found.path, stat_ref(found.target, found.stat)
    else:
        raise InputError(f"no such file or directory: {path}")


def iter_s3(
    prefix_uri: str, s3_client: Any, start_after: str | None = None, flat: bool = False
) -> Iterator[ImageRef]:
    """Every object under an `s3://bucket/prefix`, via paginated ListObjectsV2, in key order;
    with `flat`, only those directly under it (delimiter `/`).

    `start_after` is a key: listing resumes after it (continuation tokens expire; keys do not).
    """
    loc = parse_s3(prefix_uri)
    paginator = s3_client.get_paginator("list_objects_v2")
    extra = {"StartAfter": start_after} if start_after else {}
    if flat:
        extra["Delimiter"] = "/"
    try:
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key, **extra):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                yield ImageRef(
                    uri=s3_uri(loc.bucket, obj["Key"]),
                    bucket=loc.bucket,
                    key=obj["Key"],
                    etag=obj.get("ETag", "").strip('"') or None,
                    size_bytes=obj.get("Size"),
                    last_modified=obj.get("LastModified"),
                )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise InputError(f"cannot list {prefix_uri}: {code or exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot list {prefix_uri}: {exc}") from exc


def _uri_of(line: str) -> str | None:
    """The URI on one line of a URI list; None for a blank line or a `#` comment."""
    uri = line.strip()
    return uri if uri and not uri.startswith("#") else None


def iter_uri_file(path: Path, start_after: str | None = None) -> Iterator[tuple[str, ImageRef]]:
    """(line number, reference) for one URI per line, skipping blanks and `#` comments.

    Bytes that are not UTF-8 come through as surrogate escapes: the crawl records such a line
    as a bad message and goes on, rather than the whole list failing to read.
    """
    skip = int(start_after or 0)
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            uri = _uri_of(line)
            if number > skip and uri:
                yield str(number), ImageRef(uri=uri)


def count_uri_file(path: Path) -> int:
    """How many URIs a list holds (the lines `iter_uri_file` yields)."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        return sum(1 for line in f if _uri_of(line))


def iter_positions(
    source: str, s3_client: Any | None, start_after: str | None
) -> Iterator[tuple[str, ImageRef]]:
    """(resume position, reference) pairs of one source, in a stable order.

    A position is the S3 key, the walked path of a local file (its URI, unless it is a
    symlink: the walk goes by the links' paths), or the line number of a URI list (`@FILE`);
    every position can be stored in the database (see `local_position`). Every object and file
    is given: the crawl judges names (`Filters`) and counts what it skips.
    """
    if is_s3(source):
        if s3_client is None:
            raise InputError(f"{source}: no S3 client configured")
        for ref in iter_s3(source, s3_client, start_after):
            yield ref.key or ref.uri, ref
    elif source.startswith("@"):
        path = Path(source[1:])
        if not path.is_file():
            raise InputError(f"no such URI list: {path}")
        yield from iter_uri_file(path, start_after)
    else:
        start_path = _local_uri_at(start_after) if start_after else None
        for walked, ref in iter_local_positions(Path(source), start_path, suffixes=None):
            yield local_position(walked), ref


def local_position(uri: str) -> str:
    """The resume position of a local file: its URI, or its bytes in hex when the name is not
    valid UTF-8 (it carries surrogate escapes, which the database cannot store)."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return _BYTES_POSITION + os.fsencode(uri).hex()
    return uri


def _local_uri_at(position: str) -> str:
    if position.startswith(_BYTES_POSITION):
        return os.fsdecode(bytes.fromhex(position.removeprefix(_BYTES_POSITION)))
    return position


def s3_body(s3_client: Any | None, bucket: str, key: str, where: str, **extra: str) -> Any:
    """The streaming body of one object (a table, an inventory file; `extra`: `Range`...),
    errors in one line naming `where`: a refusal or missing object is the input's fault, an
    unreachable store is not."""
    if s3_client is None:
        raise InputError(f"{where}: no S3 client configured")
    try:
        return s3_client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise InputError(f"cannot read {where}: {code or exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot read {where}: {exc}") from exc


@contextmanager
def s3_stream(s3_client: Any | None, bucket: str, key: str, seekable: bool) -> Iterator[IO[bytes]]:
    """One object's bytes: streamed, or spooled to a temporary file when the reader must seek
    (Parquet reads its footer first)."""
    body = s3_body(s3_client, bucket, key, f"s3://{bucket}/{key}")
    try:
        if not seekable:
            yield body
            return
        with tempfile.TemporaryFile() as spool:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                spool.write(chunk)
            spool.seek(0)
            yield spool
    finally:
        body.close()
