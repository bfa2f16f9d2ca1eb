"""Small things a newcomer meets (issue 23, item 15): a `postgres://` URL as Heroku and most
hosting panels print it, `-v` after the subcommand, and `dlq show` with "—" for what a letter
lacks."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from conftest import run_cli

from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect, normalise_database_url
from capworks.schema.errors import Code, ImageError
from capworks.schema.uris import ImageRef
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter


def test_postgres_urls_without_a_driver_use_psycopg() -> None:
    assert normalise_database_url("postgres://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert normalise_database_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    for kept in ("postgresql+psycopg://u@h/d", "sqlite:///c.db", "mysql://h/d"):
        assert normalise_database_url(kept) == kept


def test_a_postgres_url_connects_to_the_real_postgresql(pg_url: str) -> None:
    plain_url = pg_url.replace("postgresql+psycopg://", "postgres://", 1)
    engine = connect(plain_url)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_verbose_may_follow_the_subcommand(pg_url: str) -> None:
    plain_url = pg_url.replace("postgresql+psycopg://", "postgres://", 1)
    before = run_cli("-v", "search", "nothing", "--db", plain_url)
    after = run_cli("search", "nothing", "--db", plain_url, "-v")
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert after.stdout == before.stdout


def test_dlq_show_prints_a_dash_for_what_a_letter_does_not_have(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    config = CheckpointConfig(model_dir=tmp_path, model_id="m", revision="r")
    failed = Outcome(ImageRef("/p/bad.png"), ImageError(Code.UNDECODABLE, "cannot identify"))
    ResultWriter(connect(url), config).save([failed])
    shown = run_cli("dlq", "--db", url, "show", "/p/bad.png")
    assert shown.returncode == 0, shown.stderr
    assert "None" not in shown.stdout
    assert "replay_job: —" in shown.stdout and "code: undecodable" in shown.stdout


def test_health_with_no_worker_says_that_none_is_beating(pg_url: str) -> None:
    redis_db = os.environ.get("CAPWORKS_TEST_REDIS_DB", "15")
    env = {
        "CAPWORKS_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "CAPWORKS_QUEUE_NAME": f"capworks-small-{uuid.uuid4().hex[:8]}",
    }
    done = run_cli("health", "--db", pg_url, env=env)
    assert done.returncode == 0, done.stderr
    assert "0 workers beating" in done.stdout


def test_enqueue_and_status_say_they_cannot_reach_the_broker(tmp_path: Path) -> None:
    env = {
        "CAPWORKS_BROKER_URL": "redis://127.0.0.1:9/0",  # nothing listens on the discard port
        "CAPWORKS_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}",
        "CAPWORKS_MODEL": "shapes",
    }
    for command in (("enqueue", str(tmp_path), "--no-progress"), ("status",)):
        done = run_cli(*command, env=env, timeout=120)
        assert done.returncode == 1, done.stdout
        line = done.stderr.strip()
        assert line.startswith("capworks: error: cannot reach the broker"), line
        assert "127.0.0.1:9/0" in line and "storage_unavailable" not in line
        assert "\n" not in line


def test_an_unknown_capworks_variable_is_warned_once_with_the_closest_setting(
    tmp_path: Path,
) -> None:
    env = {"CAPWORKS_MODLE": "shapes", "CAPWORKS_CACHE_DIR": str(tmp_path)}
    done = run_cli("checkpoint", "list", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "capworks: warning: CAPWORKS_MODLE is not a capworks setting and is ignored "
        "(did you mean CAPWORKS_MODEL?)"
    ]
    clean = run_cli("checkpoint", "list", env={"CAPWORKS_CACHE_DIR": str(tmp_path)})
    assert clean.returncode == 0 and clean.stderr == "", clean.stderr
