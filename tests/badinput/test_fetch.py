"""The fetcher alone on references no store can serve (no server: refused before any request)."""

from __future__ import annotations

import pytest

from capworks.schema.errors import Code, StorageError
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef
from capworks.seaweed import s3_client
from capworks.workers.fetch import StoreFetcher


@pytest.mark.parametrize("bucket", ["bad name!", "ünïcödé", "a:b"])
def test_a_bucket_name_s3_cannot_have_is_a_bad_uri_not_a_retry(bucket: str) -> None:
    closed_port = s3_client("http://127.0.0.1:9")  # nothing listens: a request would be refused
    fetcher = StoreFetcher.from_settings(Settings(max_image_bytes=100), closed_port)
    with pytest.raises(StorageError) as info:
        fetcher.fetch(ImageRef(f"s3://{bucket}/photo.jpg", bucket=bucket, key="photo.jpg"))
    assert info.value.code is Code.BAD_URI and "bucket name" in info.value.message.lower()
