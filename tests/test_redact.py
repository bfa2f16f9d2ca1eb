"""`schema.redact`: secrets out of logs, errors, stored rows and task argument reprs (no server)."""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import pytest

from capworks.schema.queue import make_celery, redis_tls_options, task_reprs
from capworks.schema.redact import (
    RedactingFilter,
    redact,
    redact_uri,
    register_secrets,
    url_password,
)
from capworks.schema.settings import Settings
from capworks.schema.storage import make_s3_client

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/a%20b.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
    "&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)


def test_a_huge_text_without_secrets_is_redacted_in_linear_time() -> None:
    # A malformed job padded with 5 MB of letters once froze a worker: an unbounded URL scheme
    # pattern tried every start position to the end of the run (hours, holding the GIL).
    text = "x" * 4_000_000 + " redis://:pw12345@h/0 " + "y:" * 500_000 + "@"
    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(redact(text)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert out, "redact did not finish in 120 s on 5 MB"
    assert "pw12345" not in out[0] and out[0].startswith("x" * 4_000_000)


def test_url_passwords_are_masked_and_the_rest_of_the_url_kept() -> None:
    text = "cannot reach postgresql+psycopg://cap:s3cr%40t@db:5432/captions and rediss://:pw9@r/0"
    assert redact(text) == (
        "cannot reach postgresql+psycopg://cap:***@db:5432/captions and rediss://:***@r/0"
    )
    assert url_password("postgresql://cap:s3cr%40t@db/x") == "s3cr@t"
    assert url_password("redis://127.0.0.1:6379/0") is None


def test_presigned_signature_credential_and_token_are_masked() -> None:
    out = redact(PRESIGNED)
    for secret in ("0123456789abcdef", "AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert secret not in out
    assert "X-Amz-Expires=900" in out and out.startswith("https://bucket.s3.amazonaws.com/a%20b")
    assert redact("http://h/k?AWSAccessKeyId=AKIA1&Signature=abc%2Bdef&Expires=1") == (
        "http://h/k?AWSAccessKeyId=***&Signature=***&Expires=1"
    )


def test_bearer_tokens_and_registered_secrets_are_masked_anywhere() -> None:
    register_secrets(["a-long-s3-secret-key", "short", None])
    assert redact("Authorization: Bearer tok.en-123, next") == "Authorization: Bearer ***, next"
    assert redact("botocore said a-long-s3-secret-key!") == "botocore said ***!"
    assert redact("short") == "short"  # too short to hunt as a bare value


def test_an_s3_uri_is_stored_as_it_is_an_http_one_redacted() -> None:
    assert redact_uri("s3://b/photos/sig=1 Bearer x.jpg") == "s3://b/photos/sig=1 Bearer x.jpg"
    assert "X-Amz-Signature=***" in redact_uri(PRESIGNED)


def test_the_log_filter_masks_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("capworks.test_redact")
    caplog.handler.addFilter(RedactingFilter())
    try:
        raise ValueError(f"fetch failed: {PRESIGNED}")
    except ValueError:
        logger.exception("job %s: %s", "j1", "redis://:hunter22@127.0.0.1:1/0")
    text = caplog.text
    assert "hunter22" not in text and "0123456789abcdef" not in text
    assert "redis://:***@127.0.0.1:1/0" in text and "X-Amz-Signature=***" in text


def test_settings_hold_the_s3_secret_as_secretstr_and_register_every_secret() -> None:
    settings = Settings(
        s3_secret_access_key="s3-secret-value",
        database_url="postgresql://u:db-password@h/x",
        broker_url="rediss://:redis-password@h:6380/0",
    )
    assert "s3-secret-value" not in repr(settings)
    assert set(settings.secret_values()) >= {"s3-secret-value", "db-password", "redis-password"}


def test_task_reprs_name_the_job_without_the_signature() -> None:
    body = {"v": 1, "id": "crawl.0001", "images": [[PRESIGNED, None, None, None]] * 3}
    reprs = task_reprs(body)
    assert reprs["argsrepr"].startswith("[job crawl.0001: 3 images, https://bucket")
    # A retry is a new task: its attempt is labelled, not a bare number after the URI.
    assert task_reprs(body, 2)["argsrepr"].startswith("[job crawl.0001 (attempt 2): 3 images")
    assert not task_reprs(body, 2)["argsrepr"].endswith(" 2]")
    assert "0123456789abcdef" not in reprs["argsrepr"] and reprs["kwargsrepr"] == "{}"


def test_a_rediss_broker_verifies_its_certificate_with_the_configured_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = Settings(broker_url="rediss://:pw@127.0.0.1:6380/0", redis_ca_file=ca)
    options = redis_tls_options(settings)
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_ca_certs"] == str(ca)
    assert make_celery(settings).conf.broker_use_ssl == options
    assert redis_tls_options(Settings(broker_url="redis://127.0.0.1:6379/0")) == {}


def test_an_s3_ca_bundle_is_what_boto3_verifies_https_with(tmp_path: Path) -> None:
    bundle = tmp_path / "private-ca.pem"
    settings = Settings(
        s3_endpoint_url="https://127.0.0.1:1", s3_region="us-east-1", s3_ca_bundle=bundle
    )
    assert make_s3_client(settings)._endpoint.http_session._verify == str(bundle)
    assert make_s3_client(Settings(s3_region="us-east-1"))._endpoint.http_session._verify != str(
        bundle
    )
