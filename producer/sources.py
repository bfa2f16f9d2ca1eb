"""Walking inputs: local files and folders, `s3://bucket/prefix` listings, http(s) URLs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from schema.errors import Code, StorageError
from schema.uris import ImageRef, file_uri, is_http, is_s3, parse_s3, s3_uri

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}
)


class InputError(ValueError):
    """An input on the command line that does not exist or cannot be listed."""


def iter_refs(inputs: Iterable[str], s3_client: Any | None) -> Iterator[ImageRef]:
    """Every image reference under the given inputs, in a stable order per input."""
    for item in inputs:
        if is_s3(item):
            if s3_client is None:
                raise InputError(f"{item}: no S3 client configured")
            yield from iter_s3(item, s3_client)
        elif is_http(item):
            yield ImageRef(uri=item)
        else:
            yield from iter_local(Path(item))


def iter_local(path: Path) -> Iterator[ImageRef]:
    """A file, or the image files under a folder (by suffix, recursively, sorted)."""
    if path.is_file():
        yield ImageRef(uri=file_uri(path), size_bytes=path.stat().st_size)
    elif path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            if child.suffix.lower() in IMAGE_SUFFIXES:
                yield ImageRef(uri=file_uri(child), size_bytes=child.stat().st_size)
    else:
        raise InputError(f"no such file or directory: {path}")


def iter_s3(prefix_uri: str, s3_client: Any) -> Iterator[ImageRef]:
    """Every object under an `s3://bucket/prefix`, via paginated ListObjectsV2."""
    loc = parse_s3(prefix_uri)
    paginator = s3_client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                yield ImageRef(
                    uri=s3_uri(loc.bucket, obj["Key"]),
                    bucket=loc.bucket,
                    key=obj["Key"],
                    etag=obj.get("ETag", "").strip('"') or None,
                    size_bytes=obj.get("Size"),
                )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise InputError(f"cannot list {prefix_uri}: {code or exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot list {prefix_uri}: {exc}") from exc
