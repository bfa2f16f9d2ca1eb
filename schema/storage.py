"""S3 client construction, shared by the producer (listing) and workers (fetching)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from schema.settings import Settings


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
    return boto3.session.Session().client(
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
