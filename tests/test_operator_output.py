"""Nothing an uploader names can mislead an operator: outside values (keys, URIs, captions,
messages, host names) print as plain text with control characters escaped, log records stay on
one line, and an unexpected error of the CLI is one redacted line, its traceback only with -v.

The CLI runs as a subprocess on a real PostgreSQL database; renderers are checked in-process."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REPO
from rich.console import Console
from sqlalchemy import text

from capworks.commands import caption, search, status
from capworks.commands import eval as eval_command
from capworks.farm import Activity, FarmStatus, QueueDepth, WorkerState
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError, Code, ImageError
from capworks.schema.heartbeat import Heartbeat
from capworks.schema.redact import RedactingFilter, escape_controls
from capworks.schema.search import Hit
from capworks.schema.uris import ImageRef
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

MARKUP_KEY = "photos/[/b].jpg"
ESC_KEY = "photos/\x1b[31mred\x1b[0m.jpg"
LINK_MESSAGE = "cannot identify [link=https://evil.example]click here[/link] [bold]now"
SECRET = "operator-secret-7f3a9b21"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(Path(sys.executable).parent / "capworks"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def dead_letters(db_url: str) -> None:
    config = CheckpointConfig(model_dir=Path("."), model_id="m", revision="r1")
    outcomes = [
        Outcome(ImageRef(f"s3://up/{key}", bucket="up", key=key), ImageError(code, message))
        for key, code, message in [
            (MARKUP_KEY, Code.UNDECODABLE, LINK_MESSAGE),
            (ESC_KEY, Code.UNDECODABLE, "bad\x1b]0;owned\x07 title"),
        ]
    ]
    ResultWriter(connect(db_url), config).save(outcomes, job_id="job-1")


def test_dlq_list_prints_markup_and_escape_sequences_of_keys_as_plain_escaped_text(
    pg_url: str,
) -> None:
    dead_letters(pg_url)
    result = cli("dlq", "--db", pg_url, "list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert MARKUP_KEY in out and "[link=https://evil.example]" in out and "[bold]now" in out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[31mred\\x1b[0m.jpg" in out and "\\x1b]0;owned\\x07" in out
    # On a terminal with colours the table is styled, but no outside value styles or links it.
    colour = cli("dlq", "--db", pg_url, "list", env={"FORCE_COLOR": "1", "TERM": "xterm"})
    assert colour.returncode == 0, colour.stderr
    assert "\x1b]8;" not in colour.stdout  # no hyperlink
    assert "\x1b[31m" not in colour.stdout and "\x1b]0;" not in colour.stdout
    assert "\\x1b[31mred" in colour.stdout


def test_dlq_show_escapes_control_characters(pg_url: str) -> None:
    dead_letters(pg_url)
    result = cli("dlq", "--db", pg_url, "show", f"s3://up/{ESC_KEY}")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout


def render(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_search_hits_print_captions_uris_and_the_query_literally() -> None:
    hit = Hit(
        f"s3://up/{ESC_KEY}", "a [/b] dog [link=https://evil.example]x[/link]", 1.0, 0.5,
        "m", "r", datetime(2026, 1, 1, tzinfo=UTC), {"[red]tag": 0.9},
    )  # fmt: skip
    out = render(search.hits_table([hit], "[/i] dog"))
    assert "a [/b] dog" in out and "[red]tag" in out and "[/i] dog" in out
    assert "\x1b]8;" not in out and "\x1b[31m" not in out and "\\x1b[31mred" in out


def test_caption_results_print_uris_and_messages_literally(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = ImageRef(f"/tmp/{ESC_KEY}")
    caption.print_results([Outcome(ref, CapworksError(Code.UNDECODABLE, LINK_MESSAGE))], False)
    out = capsys.readouterr().out
    assert "[link=https://evil.example]" in out and "\x1b" not in out and "\\x1b[31m" in out


def test_eval_report_prints_uris_captions_and_references_literally(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = {
        "model": {"model_id": "[/b]model", "revision": "", "settings_hash": "h"},
        "metrics": {"CIDEr-D": 0.5},
        "images_scored": 1,
        "reference_captions": 1,
        "tokenizer": "simple",
        "worst": [{"cider_d": 0.1, "uri": ESC_KEY, "caption": "[/i]", "references": ["[link=x]y"]}],
        "not_scored": [{"uri": MARKUP_KEY, "reason": "[red]missing"}],
        "notes": ["a note [/dim]"],
    }
    eval_command.print_report(report)
    out = capsys.readouterr().out
    for literal in ("[/b]model", "[/i]", "[link=x]y", MARKUP_KEY, "[red]missing", "a note [/dim]"):
        assert literal in out, literal
    assert "\x1b" not in out and "\\x1b[31m" in out


def test_status_prints_worker_host_names_literally() -> None:
    now = datetime.now(UTC).timestamp()
    values = {
        "instance": "i", "host": "[/b]\x1b[31mhost", "pid": 1, "device": "[link=x]cpu",
        "model": "[bold]m", "queue": "q", "jobs_in_flight": 0, "images_waiting": 0,
        "started_at": now, "beat_at": now, "pid_space": "", "node": "",
    }  # fmt: skip
    beat = Heartbeat(**{f.name: values[f.name] for f in fields(Heartbeat)})
    farm = FarmStatus(
        QueueDepth(0, 0, False, 0, 0),
        [WorkerState(beat, 1.0, False, False)],
        Activity(0, 0, 0.0),
        [],
        None,
    )
    out = render(status.render(farm))
    assert "[/b]" in out and "[link=x]cpu" in out and "[bold]m" in out
    assert "\x1b[31mhost" not in out and "\\x1b[31mhost" in out and "\x1b]8;" not in out


def test_a_log_record_with_a_newline_in_an_argument_stays_on_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("capworks.test.injection")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("skipped %s", "a.jpg\nCRITICAL all workers stopped\r\x1b[2Jx\u2028y")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(stream.getvalue().split("\n")) == 2 and len(lines) == 1, lines
    assert lines[0] == "WARNING skipped a.jpg\\nCRITICAL all workers stopped\\r\\x1b[2Jx\\u2028y"


def test_escape_controls_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape_controls("café [/b] 猫.jpg") == "café [/b] 猫.jpg"
    assert escape_controls("a\tb\x00c\x7f\x9b\u202e") == "a\\tb\\x00c\\x7f\\x9b\\u202e"
    assert escape_controls("a\nb", newlines=True) == "a\nb"


def test_an_unexpected_error_is_one_redacted_line_and_its_traceback_only_with_verbose(
    pg_url: str,
) -> None:
    engine = connect(pg_url)
    with engine.begin() as conn:  # a schema broken behind capworks' back: an error it never expects
        conn.execute(text("DROP TABLE failures CASCADE"))
    engine.dispose()
    env = {"CAPWORKS_EVENTS_TOKEN": SECRET}
    result = cli("dlq", "--db", pg_url, "list", "--prefix", SECRET, env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capworks: error: "), result.stderr[-2000:]
    assert SECRET not in result.stderr and "Traceback" not in result.stderr
    verbose = cli("-v", "dlq", "--db", pg_url, "list", "--prefix", SECRET, env=env)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and SECRET not in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("capworks: error: ")


def test_a_search_with_thousands_of_words_is_refused_in_one_line_not_by_postgresql(
    pg_url: str,
) -> None:
    connect(pg_url).dispose()
    words = " ".join(f"w{i:x}" for i in range(20_000))
    result = cli("search", "--db", pg_url, "--", words)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "at most 64" in lines[0], result.stderr[-2000:]
    phrase = cli("search", "--db", pg_url, "--", f'"{words}"')
    assert phrase.returncode == 1 and "at most 64" in phrase.stderr, phrase.stderr[-2000:]
    fine = cli("search", "--db", pg_url, "--", " ".join(f"w{i}" for i in range(64)))
    assert fine.returncode == 0, fine.stderr[-2000:]
