"""Parsing of image references: local paths, `s3://bucket/key` and http(s) URLs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from capworks.schema.errors import Code, StorageError


@dataclass(frozen=True)
class ImageRef:
    """An image as a URI plus what the store told us about it."""

    uri: str
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    etag: str | None = None
    size_bytes: int | None = None
    last_modified: datetime | None = None


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or key prefix)."""

    bucket: str
    key: str


def is_s3(uri: str) -> bool:
    """True for `s3://` URIs."""
    return uri.startswith("s3://")


def is_http(uri: str) -> bool:
    """True for http and https URLs."""
    return uri.startswith(("http://", "https://"))


def parse_s3(uri: str) -> S3Location:
    """Split `s3://bucket/key` into its parts; the key may be empty or a prefix."""
    if not is_s3(uri):
        raise StorageError(Code.BAD_URI, f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(Code.BAD_URI, f"no bucket in {uri!r}")
    return S3Location(bucket, key)


def s3_uri(bucket: str, key: str) -> str:
    """The canonical URI of an object; keys are kept verbatim (spaces, `+`, non-ASCII)."""
    return f"s3://{bucket}/{key}"


def file_uri(path: Path) -> str:
    """The canonical URI of a local file: its absolute path."""
    return str(path.resolve())


def local_path(uri: str) -> Path:
    """The path of a local URI (a bare path or `file://`)."""
    if uri.startswith("file://"):
        return Path(urlsplit(uri).path)
    return Path(uri)
