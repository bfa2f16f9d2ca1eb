"""Fetching image bytes: the `Fetcher` seam, and `StoreFetcher` for local files (under the file
roots only), S3 and http(s) (through the address guard), with failures mapped to error codes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from capworks.schema.errors import Code, StorageError
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef, S3Location, is_http, is_s3, local_path, parse_s3
from capworks.workers.fileroots import FileRoots
from capworks.workers.guard import IPNetwork
from capworks.workers.http_fetch import GuardedHttp

NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden"})


@dataclass(frozen=True)
class Fetched:
    """Bytes that are not what the reference described (an object overwritten since it was
    listed), with the reference of what was read: the caption belongs to these bytes."""

    data: bytes
    ref: ImageRef


class Fetcher(Protocol):
    """Where the image path gets bytes from; the seam a test or a guarded fetcher plugs into."""

    def fetch(self, ref: ImageRef) -> bytes | Fetched:
        """The encoded bytes of the image (`Fetched` when they are another version than `ref`
        names), or `StorageError` with a code."""
        ...


class StoreFetcher:
    """Reads the bytes behind a reference; reads at most `max_bytes + 1` so a huge object costs
    little (the decoder then refuses it as too large). The S3 endpoint is the operator's and is
    not guarded; http(s) URIs go through `http`, local paths through `file_roots`. `s3_client`
    is a client or a `schema.storage.LazyS3Client`, which builds one on the first `s3://` fetch
    (the worker's: no credential lookup, so no metadata probe, without an S3 reference)."""

    def __init__(
        self, s3_client: Any, max_bytes: int, http: GuardedHttp, file_roots: FileRoots
    ) -> None:
        self._s3 = s3_client
        self._max_bytes = max_bytes
        self._http = http
        self._file_roots = file_roots

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        s3_client: Any,
        *,
        file_roots: Iterable[Path] = (),
        allow: Iterable[IPNetwork] = (),
    ) -> StoreFetcher:
        """The fetcher the settings describe, with a one-shot command's own roots and networks
        added to theirs."""
        http = GuardedHttp(
            settings.max_image_bytes,
            settings.http_timeout_s,
            (*settings.fetch_allow_cidrs, *allow),
        )
        roots = FileRoots((*settings.file_roots, *file_roots))
        return cls(s3_client, settings.max_image_bytes, http, roots)

    def fetch(self, ref: ImageRef) -> bytes | Fetched:
        """The bytes of the object `ref` names, or `StorageError` with a code."""
        uri = ref.uri
        if is_s3(uri):
            # The URI is the image's identity in the database, so it, not the message's
            # bucket and key fields, says which object is read.
            return self._fetch_s3(ref, parse_s3(uri))
        if is_http(uri):
            return self._http.get(uri)
        return self._fetch_file(uri)

    def _fetch_file(self, uri: str) -> bytes:
        return self._file_roots.read(local_path(uri), self._max_bytes)

    def _fetch_s3(self, ref: ImageRef, loc: S3Location) -> bytes | Fetched:
        """A listed version is read by its id; otherwise the current object, and when its ETag
        is not the listed one (overwritten since), it is captioned as what it now is."""
        uri = ref.uri
        pin = {"VersionId": ref.version_id} if ref.version_id else {}
        try:
            obj = self._s3.get_object(Bucket=loc.bucket, Key=loc.key, **pin)
            body = obj["Body"]
            try:
                data: bytes = body.read(self._max_bytes + 1)
            finally:
                body.close()
            etag = str(obj.get("ETag", "")).strip('"') or None
            if ref.etag and etag and etag != ref.etag and not ref.version_id:
                now = replace(ref, etag=etag, size_bytes=obj.get("ContentLength", ref.size_bytes))
                return Fetched(data, now)
            return data
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in NOT_FOUND_CODES or status == 404:
                raise StorageError(Code.NOT_FOUND, f"no such object: {uri}") from exc
            if code in DENIED_CODES or status == 403:
                raise StorageError(Code.ACCESS_DENIED, f"access denied: {uri}") from exc
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{uri}: {code} {status}") from exc
        except ParamValidationError as exc:  # a bucket name S3 cannot have: no retry helps
            raise StorageError(Code.BAD_URI, f"{uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(Code.STORAGE_UNAVAILABLE, f"{uri}: {exc}") from exc
