"""Every kind of bad input in one `capworks caption` run over one folder, as a user runs it:
each ends as its caption or its dead letter with the table's code, and the run finishes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO

from badinput.cases import CASES
from badinput.support import mismatches, outcome_table, read_outcomes, unprivileged
from capworks.schema.uris import file_uri

pytestmark = pytest.mark.slow


class _Gone(BaseHTTPRequestHandler):
    """Answers every request as a store does for an object deleted since it was listed."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        self.send_error(404, "deleted")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def gone_base_url() -> Iterator[str]:
    """A loopback HTTP server whose every object is gone (404), stopped after the test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gone)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def lay_out(root: Path, blobs: dict[str, bytes], gone_base_url: str) -> dict[str, str]:
    """Every case as a file under `root` (an unreadable one for "denied"), or, for "deleted",
    a URL whose object is gone; returns kind -> the URI the command records it under."""
    uri_of = {}
    for case in CASES:
        if case.placement == "deleted":
            uri_of[case.kind] = f"{gone_base_url}/{case.filename}"
            continue
        path = root / case.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[case.kind])
        if case.placement == "denied":
            path.chmod(0)
        uri_of[case.kind] = file_uri(path)
    return uri_of


def test_every_bad_input_kind_ends_as_the_table_says_in_one_caption_run(
    tmp_path: Path,
    case_blobs: dict[str, bytes],
    same_bytes_captions: dict[str, str],
    gone_base_url: str,
) -> None:
    root = tmp_path / "cases"
    uri_of = lay_out(root, case_blobs, gone_base_url)
    db_url = f"sqlite:///{tmp_path / 'badinput.db'}"
    exe = Path(sys.executable).parent / "capworks"
    gone = [uri for uri in uri_of.values() if uri.startswith("http")]
    argv = [*unprivileged(), str(exe), "caption", str(root), *gone]
    argv += ["--allow-address", "127.0.0.0/8"]  # the gone objects' server is on loopback
    argv += ["--model", "shapes", "--db", db_url, "--json", "--no-progress"]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    took_s = time.monotonic() - started
    assert result.returncode == 3, result.stderr[-3000:]  # 3: some images failed, none lost
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    seen = read_outcomes(db_url)
    print(f"capworks caption over {len(CASES)} kinds took {took_s:.1f} s\n")
    print(outcome_table(uri_of, seen))
    assert mismatches(uri_of, seen, same_bytes_captions) == []
    assert set(seen) == set(uri_of.values())  # nothing else listed, nothing lost
    # The JSON lines say the same as the database, one line per image.
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(d["uri"] for d in lines) == sorted(uri_of.values())
    for d in lines:
        assert d.get("caption") == seen[d["uri"]].caption
        assert d.get("error") == seen[d["uri"]].code
