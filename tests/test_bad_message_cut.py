"""An oversized job message is cut to a bounded size, noting its length, before it is redacted
and kept in `bad_messages`: redaction's regexes never run over the whole message (a 100 MiB one
cost 8 s of them and ~600 MiB). Real database (SQLite and PostgreSQL); the redactions are
counted by a spy wrapped around the real `redact`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from capworks.schema import redact as redact_module
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.jobs import MalformedJob
from capworks.schema.redact import MAX_STORED_CHARS, stored_text
from capworks.schema.tables import BadMessage
from capworks.workers import persist
from capworks.workers.persist import ResultWriter

MESSAGE_CHARS = 20 * 1024 * 1024


def spy_on_redact(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text `redact` is given, wherever it is called from."""
    seen: list[int] = []
    real: Callable[[str], str] = redact_module.redact

    def counting(text: str) -> str:
        seen.append(len(text))
        return real(text)

    monkeypatch.setattr(redact_module, "redact", counting)
    monkeypatch.setattr(persist, "redact", counting)
    return seen


def test_an_oversized_message_is_cut_before_it_is_redacted_and_stored(
    any_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = connect(any_db_url)
    writer = ResultWriter(db, CheckpointConfig(model_dir=Path("."), model_id="m", revision="r"))
    secret_url = "redis://:hunter2-password@broker:6379/0"
    message = {"id": "big", "images": secret_url + " " + "A" * MESSAGE_CHARS}
    seen = spy_on_redact(monkeypatch)
    writer.save_message_failure("big", MalformedJob("images is not a list"), message)
    assert seen and max(seen) <= 2 * MAX_STORED_CHARS, max(seen)
    with db.connect() as conn:
        (row,) = conn.execute(select(BadMessage.job_key, BadMessage.body)).all()
    assert row.job_key == "big" and len(row.body) <= MAX_STORED_CHARS + 100
    assert "hunter2-password" not in row.body and "redis://:***@broker" in row.body
    assert f"{len(repr(message)):,} characters" in row.body  # the original size is noted
    db.dispose()


def test_stored_text_masks_a_secret_that_straddles_the_cut() -> None:
    head = "x" * (MAX_STORED_CHARS - 21) + " "
    text = head + "redis://:hunter2-password@broker:6379/0" + "y" * 10_000
    kept = stored_text(text, MAX_STORED_CHARS)
    assert "hunter2" not in kept and "hunter" not in kept[-60:]
    assert kept.startswith(head) and f"{len(text):,} characters" in kept


def test_stored_text_leaves_a_short_text_whole_but_redacted_and_escaped() -> None:
    assert stored_text("ok\x00 Bearer abcdef123456", 100) == "ok\\x00 Bearer ***"
