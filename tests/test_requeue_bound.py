"""A message whose outcome cannot be recorded is handed back a bounded number of times, then set
aside loudly: never requeued every few seconds for ever. A real Celery worker process, the real
Redis and a PostgreSQL database whose `bad_messages` and `failures` tables were dropped (an
error the database keeps giving, not an outage that is waited out)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import png_bytes
from pipeline_support import captions, own_queue, wait_until
from sqlalchemy import create_engine, text

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.db import connect
from capworks.schema.jobs import Job
from capworks.schema.queue import CAPTION_TASK, make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import Base
from capworks.schema.uris import ImageRef
from capworks.workers.ledger import GAVE_UP_KEY, RUNS_KEY

pytestmark = pytest.mark.slow
REQUEUES = Settings().max_record_requeues  # the default


def drop_tables(db_url: str, *names: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for name in names:
            conn.execute(text(f"DROP TABLE {name}"))
    engine.dispose()


def create_tables(db_url: str, *names: str) -> None:
    engine = create_engine(db_url)
    for name in names:
        Base.metadata.tables[name].create(engine)
    engine.dispose()


def test_a_message_whose_outcome_cannot_be_recorded_is_set_aside_after_n_requeues(
    pg_url: str, tmp_path: Path, tiny_dir: Path
) -> None:
    connect(pg_url).dispose()  # migrated; the worker finds the schema at its newest revision
    drop_tables(pg_url, "bad_messages", "failures")
    with own_queue(pg_url, tmp_path) as p:
        p.extra_env["CAPWORKS_MODEL"] = "tiny-random"
        app = make_celery(Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue))
        image = tmp_path / "photo.png"
        image.write_bytes(png_bytes(sample_scenes(1, seed=5)[0][0]))
        # A malformed message (kept in bad_messages) and a poison image (dead-lettered):
        # recording either fails on the missing table, every time.
        malformed = app.send_task(CAPTION_TASK, args=[{"v": 99}], queue=p.queue).id
        poison = Job.new([ImageRef(str(image))], job_id="poison-job")
        p.redis().set(RUNS_KEY.format(poison.job_id), 3)  # its worker died 3 times
        poisoned = app.send_task(CAPTION_TASK, args=[poison.to_wire()], queue=p.queue).id
        worker = p.start_worker()
        wait_until(
            lambda: p.queue_length() == 0 and p.redis().llen(GAVE_UP_KEY) == 2,
            120,
            "both messages set aside and the queue empty",
            lambda: p.log_text()[-3000:],
        )
        log = p.log_text()
        for task_id in (malformed, poisoned):
            handed_back = re.findall(rf"task {task_id}: recording its outcome failed", log)
            assert len(handed_back) == REQUEUES + 1, log[-3000:]
            assert re.search(rf"ERROR.*task {task_id}: .*gave up", log), log[-3000:]
        set_aside = {
            json.loads(raw)["task_id"]: json.loads(raw)
            for raw in p.redis().lrange(GAVE_UP_KEY, 0, -1)
        }
        assert set(set_aside) == {malformed, poisoned}
        assert set_aside[malformed]["args"] == [{"v": 99}]
        assert "bad_messages" in set_aside[malformed]["reason"]
        # The worker lives on and takes the next job once the database is whole again.
        assert worker.poll() is None
        create_tables(pg_url, "bad_messages", "failures")
        good = Job.new([ImageRef(str(image))], job_id="good-job")
        app.send_task(CAPTION_TASK, args=[good.to_wire()], queue=p.queue)
        wait_until(
            lambda: str(image) in captions(pg_url), 120, "the good job's caption", p.log_text
        )
        assert worker.poll() is None
