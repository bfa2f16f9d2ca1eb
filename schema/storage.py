"""S3 client construction, shared by the producer (listing) and workers (fetching)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.utils import parse_timestamp

from capworks.schema.list_pages import use_fast_list_parser
from capworks.schema.settings import Settings


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client; unset options fall back to the usual AWS settings and files."""
    config = Config(
        s3={"addressing_style": settings.s3_addressing_style},
        retries={"max_attempts": 3, "mode": "standard"},
        # Workers fetch with 16 threads; a smaller pool discards and reopens connections.
        max_pool_connections=32,
        connect_timeout=settings.http_timeout_s,
        read_timeout=settings.http_timeout_s,
    )
    client = fast_timestamp_session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=(
            settings.s3_secret_access_key.get_secret_value()
            if settings.s3_secret_access_key
            else None
        ),
        # A private CA's bundle for an https endpoint; None keeps botocore's own.
        verify=str(settings.s3_ca_bundle) if settings.s3_ca_bundle else None,
        config=config,
    )
    use_fast_list_parser(client)  # listing pages parsed without holding the GIL for long
    return client


def parse_timestamp_fast(value: str) -> datetime:
    """An ISO 8601 time as S3 listings give it (`2026-12-05T17:00:00.000Z`), parsed by the
    standard library; anything else by botocore's parser. Its general parser (dateutil) took
    three quarters of the CPU of parsing a ListObjectsV2 page of 1,000 keys."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)  # type: ignore[no-any-return]


def fast_timestamp_session() -> boto3.session.Session:
    """A boto3 session whose clients parse listing timestamps with `parse_timestamp_fast`."""
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_timestamp_fast
    )
    return boto3.session.Session(botocore_session=core)


class LazyS3Client:
    """The S3 client, built on the first `s3://` reference rather than when a worker starts:
    building one resolves AWS credentials, and without any set botocore's chain asks the cloud
    metadata address (169.254.169.254), which a worker for local files or http(s) must never
    do. Stands in for the client: any attribute (`get_object`, ...) is the built client's."""

    def __init__(
        self, settings: Settings, make: Callable[[Settings], Any] = make_s3_client
    ) -> None:
        self._settings = settings
        self._make = make
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        """Whether the client has been built yet."""
        return self._client is not None

    def client(self) -> Any:
        """The S3 client, built by the first caller (fetch threads share it)."""
        with self._lock:
            if self._client is None:
                self._client = self._make(self._settings)
            return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never the client's private parts (nor ours, mid-copy)
            raise AttributeError(name)
        return getattr(self.client(), name)
