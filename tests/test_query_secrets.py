"""Credentials in http(s) query strings and short shared secrets (issue 22, item 8).

`?token=`, `access_token=`, `key=`, `api_key=`, `X-Goog-Credential=`, `sig=` and the like are
masked wherever capworks stores or shows a URI: `images.uri`, Flower's task arguments, logs and
CLI output. One object keeps one stored URI whatever its token, so a crawl knows an image it
captioned under yesterday's token, while URIs that differ in anything else stay apart. Tokens
capworks checks (the webhook's and the metrics endpoint's) shorter than 16 characters stop the
start with one line. Flower gets the broker URL from its environment, never argv.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, png_bytes, run_cli
from pipeline_support import REDIS_URL, free_port, own_queue, queued_images, wait_until
from pydantic import SecretStr, ValidationError
from sqlalchemy import text

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.crawl import run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.queue import task_reprs
from capworks.schema.redact import RedactingFilter, is_secret_parameter, redact, redact_uri
from capworks.schema.settings import MIN_SHARED_SECRET_CHARS, Settings
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Caption, CaptionedImage
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

# name=value pairs as real services spell them: OAuth, Google signed URLs and API keys, Azure SAS,
# API gateways; each value is what must never be stored or shown.
CREDENTIALS = {
    "token": "tok-3f9a1c77e2",
    "access_token": "ya29.a0AfH6SM-x",
    "X-Goog-Credential": "svc%40proj.iam.gserviceaccount.com%2F20261205",
    "X-Goog-Signature": "5a1b2c3d4e5f60718293",
    "X-Amz-Credential": "AKIAEXAMPLE%2F20261205",
    "key": "AIzaSyD-example-key-1",
    "api_key": "sk_live_51Hx9example",
    "apikey": "apikey-value-77",
    "x-api-key": "gateway-key-81",
    "sig": "r8Vn%2Bsas-signature%3D",
    "client_secret": "cs-9911aa",
    "password": "hunter2hunter2",
    "auth": "Basic-dXNlcjpwdw",
    "subscription-key": "azure-sub-42aa",
}


@pytest.mark.parametrize(("name", "value"), CREDENTIALS.items())
def test_each_credential_parameter_is_masked_and_the_rest_of_the_uri_kept(
    name: str, value: str
) -> None:
    uri = f"https://img.example/photos/a%20b.jpg?w=640&{name}={value}&fmt=jpg"
    shown = redact_uri(uri)
    assert value not in shown and shown == (
        f"https://img.example/photos/a%20b.jpg?w=640&{name}=***&fmt=jpg"
    )
    assert value not in redact(f"GET {uri} failed") and is_secret_parameter(name)


def test_a_credential_in_the_fragment_first_place_or_encoded_name_is_masked_too() -> None:
    assert redact_uri("https://h/a.jpg#access_token=t0k-123&state=9") == (
        "https://h/a.jpg#access_token=***&state=9"
    )
    assert redact_uri("https://h/a.jpg?TOKEN=abc&x=1") == "https://h/a.jpg?TOKEN=***&x=1"
    assert redact_uri("https://h/a.jpg?%74oken=abc") == "https://h/a.jpg?%74oken=***"
    assert redact_uri("https://h/a.jpg?a=1;api_key=zz") == "https://h/a.jpg?a=1;api_key=***"


@pytest.mark.parametrize("name", ["monkey", "keyword", "tokens", "width", "id", "sort", "keys"])
def test_parameters_that_only_look_alike_are_kept(name: str) -> None:
    uri = f"https://h/render?{name}=value-17&size=2"
    assert redact_uri(uri) == uri and not is_secret_parameter(name)


def test_one_object_keeps_one_uri_whatever_its_token_and_other_queries_stay_apart() -> None:
    monday = redact_uri("https://cdn.example/p/1.jpg?v=3&token=monday-token-aaaa")
    tuesday = redact_uri("https://cdn.example/p/1.jpg?v=3&token=tuesday-token-bbbb")
    assert monday == tuesday == "https://cdn.example/p/1.jpg?v=3&token=***"
    # Dropping the query instead would have made these two images one row.
    assert redact_uri("https://h/render?id=17&token=x") != redact_uri(
        "https://h/render?id=18&token=x"
    )
    assert redact_uri("s3://b/photos/token=1.jpg") == "s3://b/photos/token=1.jpg"  # a key as it is


def test_flower_arguments_and_log_lines_hide_query_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uris = [f"https://h/{n}.jpg?{k}={v}" for n, (k, v) in enumerate(CREDENTIALS.items())]
    body = {"v": 1, "id": "job-1", "images": [[u, None, None, None] for u in uris]}
    shown = task_reprs(body, 1)["argsrepr"]
    assert "https://h/0.jpg?token=***" in shown and "tok-3f9a1c77e2" not in shown
    caplog.handler.addFilter(RedactingFilter())
    logging.getLogger("capworks.test_query_secrets").warning("fetch failed: %s", " ".join(uris))
    leaked = [v for v in CREDENTIALS.values() if v in caplog.text]
    assert not leaked and "api_key=***" in caplog.text


def test_a_crawl_knows_an_image_captioned_under_another_token(
    any_db_url: str, tmp_path: Path
) -> None:
    config = CheckpointConfig(model_dir=tmp_path, model_id="m", revision="r")
    old = "https://cdn.example/p/1.jpg?v=3&token=monday-token-aaaa"
    captioned = CaptionedImage(Caption("a cat", -0.5, (), (1, 2), ()), 64, 64)
    ResultWriter(connect(any_db_url), config).save([Outcome(ImageRef(uri=old), captioned)])
    with connect(any_db_url).connect() as conn:
        stored = conn.execute(text("SELECT uri FROM images")).scalars().all()
    assert stored == ["https://cdn.example/p/1.jpg?v=3&token=***"]
    listing = tmp_path / "uris.txt"
    fresh = "https://cdn.example/p/2.jpg?v=3&token=tuesday-token-bbbb"
    listing.write_text(f"{old.replace('monday-token-aaaa', 'tuesday-token-bbbb')}\n{fresh}\n")
    with own_queue(any_db_url, tmp_path) as p:
        run_crawl(
            f"@{listing}",
            crawl_id="rotated",
            db=connect(any_db_url),
            publisher=make_publisher(Settings(broker_url=REDIS_URL, queue_name=p.queue)),
            s3_client=None,
            identity=config.identity,
        )
        assert queued_images(p) == [fresh]  # the job carries the token that fetches it


@pytest.mark.parametrize("field", ["events_token", "events_hmac_secret", "metrics_token"])
def test_a_shared_secret_shorter_than_16_characters_is_refused(field: str) -> None:
    short = "x" * (MIN_SHARED_SECRET_CHARS - 1)
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(**{field: SecretStr(short)})
    assert Settings(**{field: SecretStr("x" * MIN_SHARED_SECRET_CHARS)})
    assert Settings(**{field: SecretStr("")})  # empty: not set


@pytest.mark.parametrize(
    ("variable", "args"),
    [
        ("CAPWORKS_EVENTS_TOKEN", ("events", "--source", "webhook", "--port", "0")),
        ("CAPWORKS_EVENTS_HMAC_SECRET", ("events", "--source", "webhook", "--port", "0")),
        ("CAPWORKS_METRICS_TOKEN", ("status", "--db", "sqlite://")),
    ],
)
def test_the_cli_refuses_a_short_token_in_one_line_without_repeating_it(
    variable: str, args: tuple[str, ...]
) -> None:
    done = run_cli(*args, env={variable: "s3cr3t-7"}, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and variable in done.stderr
    assert "at least 16 characters" in done.stderr and "s3cr3t-7" not in done.stderr


def test_flower_as_the_readme_starts_it_takes_the_broker_url_from_the_environment() -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if " flower " in line and "celery" in line)
    assert "--broker" not in command and "CELERY_BROKER_URL=" in command
    password = "flower-broker-pw-7c2e"
    broker = re.sub(r"redis://", f"redis://:{password}@", REDIS_URL)
    port = free_port()
    env = {**os.environ, "CELERY_BROKER_URL": broker}
    flower = subprocess.Popen(
        [str(Path(sys.executable).parent / "celery"), "flower", "--address=127.0.0.1",
         f"--port={port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(flower.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("Broker:" in line for line in lines), 60, "Flower's broker line")
        cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().decode()
    finally:
        flower.terminate()
        flower.wait(timeout=30)
    assert password not in cmdline  # argv is world-readable in /proc
    broker_line = next(line for line in lines if "Broker:" in line)
    assert "127.0.0.1:6379" in broker_line and password not in broker_line


@contextmanager
def token_server(token: str, image: bytes) -> Iterator[str]:
    """A loopback image server that answers 403 unless the query carries `token`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            ok = f"token={token}" in self.path
            self.send_response(200 if ok else 403)
            self.send_header("Content-Length", str(len(image) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(image)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_capworks_caption_fetches_with_the_token_and_stores_and_prints_none(
    tmp_path: Path, shapes_dir: Path
) -> None:
    token, key = "caption-token-5d1e9a", "api-key-0b7c33"
    scene = png_bytes(sample_scenes(1, seed=9)[0][0])
    db = f"sqlite:///{tmp_path / 'c.db'}"
    with token_server(token, scene) as base:
        uris = [f"{base}/{n}.png?token={token}&api_key={key}&n={n}" for n in range(2)]
        done = run_cli(
            "-v", "caption", *uris, "--model", "shapes", "--db", db,
            "--allow-address", "127.0.0.0/8", "--json", "--no-progress",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert all("caption" in row for row in rows), rows  # the server saw the token
    assert {row["uri"] for row in rows} == {
        f"{base}/{n}.png?token=***&api_key=***&n={n}" for n in range(2)
    }
    with connect(db).connect() as conn:
        stored = "\n".join(
            str(row) for table in ("images", "captions", "failures")
            for row in conn.execute(text(f"SELECT * FROM {table}")).all()  # noqa: S608 - our names
        )  # fmt: skip
    assert "token=***" in stored
    for secret in (token, key):
        assert secret not in stored and secret not in done.stdout + done.stderr
