"""No secret in anything a real run leaves behind, and the pipeline over Redis with TLS.

A `redis-server` and a SeaweedFS of this module's own on loopback ports (the shared Redis on
6379 is never touched): Redis with a password on both its ports and TLS on the second, S3 with
one identity whose secret signs every request, over http and https, the TLS certificates from a
CA made here by `openssl`. The Redis password, the S3 secret (and the presigned URLs signed with
it) and the webhook's bearer token are checked by the servers: a run that did not use them
fails. The local PostgreSQL trusts loopback connections, so the database password travels
through every layer but is not checked by the server.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import redis
from botocore.config import Config
from certificates import make_certificates
from conftest import PG_ADMIN_URL, REPO, png_bytes, require_service
from event_samples import records, s3_record
from pipeline_support import (
    Pipeline,
    captions,
    count_rows,
    failures,
    free_port,
    query,
    wait_until,
)
from redis_server import RedisServer
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError
from capworks.schema.tables import Base
from capworks.seaweed import SeaweedServer, s3_client


@dataclass(frozen=True)
class SecureRedis:
    """The module's Redis: `plain_url` (password) and `tls_url` (password and TLS)."""

    password: str
    plain_port: int
    tls_port: int
    ca_file: Path

    @property
    def plain_url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.plain_port}/0"

    @property
    def tls_url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.tls_port}/0"

    def client(self) -> Any:
        return redis.Redis.from_url(self.plain_url)


S3_KEY_ID, S3_SECRET = "capworks-test-key", f"s3-secret-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA, server certificate for 127.0.0.1, its key), made for this module."""
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def secure_s3(
    tmp_path_factory: pytest.TempPathFactory, certificates: tuple[Path, Path, Path]
) -> Iterator[SeaweedServer]:
    """SeaweedFS checking every request's signature (one identity), with an https port too."""
    _, cert, key = certificates
    data = tmp_path_factory.mktemp("secure-s3")
    try:
        server = SeaweedServer(data, credentials=(S3_KEY_ID, S3_SECRET), tls=(cert, key))
    except FileNotFoundError as exc:
        require_service("SeaweedFS", str(exc))
        raise
    server.start()
    try:
        yield server
    finally:
        server.stop()


def upload(endpoint: str, bucket: str, count: int, seed: int) -> dict[str, bytes]:
    """A bucket of synthetic images on the secure server: each `s3://` URI's bytes."""
    client = s3_client(endpoint, (S3_KEY_ID, S3_SECRET))
    client.create_bucket(Bucket=bucket)
    blobs = {}
    for i, (img, _) in enumerate(sample_scenes(count, seed)):
        key = f"set{i % 2}/image {i:03d}.png"
        client.put_object(Bucket=bucket, Key=key, Body=png_bytes(img))
        blobs[f"s3://{bucket}/{key}"] = png_bytes(img)
    return blobs


@pytest.fixture(scope="module")
def secure_redis(
    tmp_path_factory: pytest.TempPathFactory, certificates: tuple[Path, Path, Path]
) -> Iterator[SecureRedis]:
    """redis-server with `requirepass` on one loopback port and TLS on another; stopped after."""
    folder = tmp_path_factory.mktemp("secure-redis")
    ca, cert, key = certificates
    server = SecureRedis(f"redis-pw-{secrets.token_hex(8)}", free_port(), free_port(), ca)
    tls = ["--tls-port", str(server.tls_port), "--tls-cert-file", str(cert),
           "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
           "--tls-auth-clients", "no"]  # fmt: skip
    process = RedisServer(server.plain_port, folder, tls, password=server.password)
    process.start()
    try:
        yield server
    finally:
        process.stop()


def queue_left(server: SecureRedis, queue: str) -> int:
    client = server.client()
    return int(client.llen(queue)) + int(client.hlen("unacked"))


def presign(endpoint: str, bucket: str, key: str) -> str:
    """A presigned GET URL (SigV4: X-Amz-Credential, X-Amz-Signature) signed with the secret."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    return str(
        client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
        )
    )


def stored_text(db_url: str) -> str:
    """Every row of every table, as text."""
    return "\n".join(
        repr(row)
        for table in Base.metadata.sorted_tables
        for row in query(db_url, lambda conn, t=table: conn.execute(select(t)).all())
    )


def queued_messages(server: SecureRedis, queue: str) -> list[tuple[dict[str, Any], str]]:
    """(headers, decoded body) of each message waiting in the queue."""
    found = []
    for raw in server.client().lrange(queue, 0, -1):
        envelope = json.loads(raw)
        found.append((envelope["headers"], base64.b64decode(envelope["body"]).decode()))
    return found


def post(url: str, body: bytes, token: str) -> int:
    request = urllib.request.Request(
        url, body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_run_with_passwords_tokens_and_presigned_urls_leaves_no_secret_anywhere(
    secure_redis: SecureRedis,
    secure_s3: SeaweedServer,
    pg_url: str,
    shapes_dir: Path,
    tmp_path: Path,
) -> None:
    s3_secret, token = S3_SECRET, f"bearer-{secrets.token_hex(8)}"
    db_password = f"db-pw-{secrets.token_hex(8)}"
    db_url = pg_url.replace("postgres@", f"postgres:{db_password}@")
    s3_endpoint = secure_s3.endpoint
    name = f"secrets-{secrets.token_hex(3)}"
    blobs = upload(s3_endpoint, name, 6, seed=12)
    keys = [uri.split("/", 3)[3] for uri in blobs]
    good = [presign(s3_endpoint, name, k) for k in keys[:3]]
    missing = [presign(s3_endpoint, name, f"gone {i}.png") for i in range(2)]
    signed = [parse_qs(urlsplit(u).query) for u in good + missing]
    hidden = [s3_secret, token, db_password, secure_redis.password]
    hidden += [q[f][0] for q in signed for f in ("X-Amz-Signature", "X-Amz-Credential")]

    p = Pipeline(db_url, s3_endpoint, tmp_path)
    p.extra_env.update(
        CAPWORKS_BROKER_URL=secure_redis.plain_url,
        CAPWORKS_S3_ACCESS_KEY_ID=S3_KEY_ID,
        CAPWORKS_S3_SECRET_ACCESS_KEY=s3_secret,
        CAPWORKS_EVENTS_TOKEN=token,
    )
    uri_list = tmp_path / "uris.txt"
    uri_list.write_text("\n".join([*list(blobs)[3:], *good, *missing]) + "\n")
    outputs = []
    port = free_port()
    events_log = (tmp_path / "events.log").open("wb")
    webhook = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "events", "--source", "webhook",
         "--port", str(port)],
        stdout=events_log, stderr=subprocess.STDOUT, env=p.env, cwd=REPO,
    )  # fmt: skip
    try:
        enqueued = p.cli("enqueue", f"@{uri_list}")
        outputs.append(enqueued.stdout + enqueued.stderr)
        assert enqueued.returncode == 0, enqueued.stderr
        url = f"http://127.0.0.1:{port}/events"
        event = records(s3_record(name, keys[0], etag='"0"'))
        wait_until(lambda: post(url, b"{}", "wrong") == 401, 60, "the webhook", lambda: "")
        assert post(url, event, token) == 200  # the token is what lets the event in
        messages = queued_messages(secure_redis, p.queue)
        assert len(messages) == 2  # the URI list's job and the event's
        assert any(good[0] in body for _, body in messages)  # the job carries what fetches
        for headers, _ in messages:
            shown = f"{headers['argsrepr']} {headers['kwargsrepr']}"
            assert "[job " in shown and not [s for s in hidden if s in shown], shown

        metrics_port = free_port()
        p.start_worker(metrics_port=metrics_port)
        wait_until(
            lambda: (
                count_rows(db_url)["captions"] + count_rows(db_url)["failures"] >= 9
                and queue_left(secure_redis, p.queue) == 0
            ),
            300,
            "every image captioned or dead-lettered",
            lambda: p.log_text()[-3000:],
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
            outputs.append(page.read().decode())
        commands = [
            ["dlq", "--db", db_url, "list"],
            ["dlq", "--db", db_url, "show", next(iter(failures(db_url)))],
            ["status", "--json", "--db", db_url],
            ["search", "shape", "--db", db_url],
            ["status", "--no-such-option", "--db", db_url],  # argparse repeats what it refused
        ]
        for args in commands:
            done = p.cli(*args)
            outputs.append(done.stdout + done.stderr)
        assert "not_found" in outputs[-5] and "capworks_images_total" in outputs[1]
    finally:
        webhook.send_signal(signal.SIGTERM)
        webhook.wait(timeout=30)
        p.stop_workers()
    got, dead = captions(db_url), failures(db_url)
    assert len(got) == 7 and sorted(dead.values()) == ["not_found", "not_found"], (got, dead)
    assert sum("X-Amz-Signature=***" in uri for uri in got) == 3  # stored without signatures
    texts = {
        "worker log": p.log_text(),
        "webhook log": (tmp_path / "events.log").read_text(errors="replace"),
        "database rows": stored_text(db_url),
        "CLI output and metrics": "\n".join(outputs),
    }
    leaks = {(where, s) for where, text in texts.items() for s in hidden if s in text}
    assert not leaks, leaks


def test_a_crawl_runs_over_redis_and_s3_with_tls_and_passwords(
    secure_redis: SecureRedis, secure_s3: SeaweedServer, shapes_dir: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'tls.db'}"
    name = f"tls-{secrets.token_hex(3)}"
    blobs = upload(secure_s3.endpoint, name, 4, seed=13)
    p = Pipeline(db_url, secure_s3.https_endpoint, tmp_path)
    p.extra_env.update(
        CAPWORKS_BROKER_URL=secure_redis.tls_url,
        CAPWORKS_REDIS_CA_FILE=str(secure_redis.ca_file),
        CAPWORKS_S3_CA_BUNDLE=str(secure_redis.ca_file),
        CAPWORKS_S3_ACCESS_KEY_ID=S3_KEY_ID,
        CAPWORKS_S3_SECRET_ACCESS_KEY=S3_SECRET,
    )
    try:
        enqueued = p.cli("enqueue", f"s3://{name}/")
        assert enqueued.returncode == 0, enqueued.stderr
        p.start_worker()
        wait_until(
            lambda: count_rows(db_url)["captions"] >= 4 and queue_left(secure_redis, p.queue) == 0,
            300,
            "captions over TLS",
            lambda: p.log_text()[-3000:],
        )
        status = p.cli("status", "--json", "--db", db_url)
        assert status.returncode == 0, status.stderr
    finally:
        p.stop_workers()
    assert set(captions(db_url)) == set(blobs)
    p.extra_env.pop("CAPWORKS_S3_CA_BUNDLE")  # the https endpoint is then not trusted
    relisted = p.cli("enqueue", "--force", f"s3://{name}/")
    assert relisted.returncode != 0 and "certificate" in relisted.stderr.lower(), relisted.stderr
    p.extra_env.pop("CAPWORKS_REDIS_CA_FILE")
    untrusted = p.cli("status", "--json", "--db", db_url)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr.lower()


def test_a_database_url_asking_for_verify_full_reaches_postgresql_as_it_is() -> None:
    """The local PostgreSQL has `ssl = off`: a URL demanding TLS is refused by libpq itself,
    which shows the setting travelled unchanged (on a server with TLS it would connect)."""
    admin = create_engine(PG_ADMIN_URL)
    try:
        with admin.connect() as conn:
            ssl_on = conn.execute(text("SHOW ssl")).scalar() == "on"
    except OperationalError as exc:
        require_service("PostgreSQL", str(exc.orig))
    finally:
        admin.dispose()
    if ssl_on:
        pytest.skip("this PostgreSQL has TLS on; the refusal below needs a server without it")
    url = PG_ADMIN_URL.replace("postgres@", "postgres:db-pw-not-shown@")
    with pytest.raises(CapworksError) as refused:
        connect(f"{url}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
    assert "SSL was required" in str(refused.value)
    assert "db-pw-not-shown" not in str(refused.value)
