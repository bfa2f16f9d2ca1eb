"""`capworks dlq`: show and purge dead letters, and replay them safely: at most once per failure,
never lost when a run is cut off, poison only when asked for, and paused while the queue is full.

Real PostgreSQL (and SQLite where the replay bookkeeping is compared in SQL) and the real Redis;
no worker runs, so what a replay published stays in the test's queue to be read back.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from pipeline_support import REDIS_URL, Pipeline, own_queue
from sqlalchemy import Engine, select, update

from capworks.commands.dlq import DeadLetter, Selection, plan_replay, replay
from capworks.producer.crawl import Publisher
from capworks.producer.enqueue import make_publisher
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError, Code, ImageError, StorageError
from capworks.schema.settings import Settings
from capworks.schema.tables import Failure, Image
from capworks.schema.uris import ImageRef
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

CONFIG = CheckpointConfig(model_dir=Path("."), model_id="m", revision="r1")
GONE = "s3://photos/gone/a.jpg"
BROKEN = "s3://photos/broken/b.jpg"
KILLER = "s3://photos/killer/c.jpg"


def error_for(code: Code) -> CapworksError:
    if code is Code.NOT_FOUND:
        return StorageError(code, "no such object")
    if code is Code.POISON:
        return CapworksError(code, "worker died 3 times while captioning it")
    return ImageError(code, "cannot identify image file")


def fail(db: Engine, *letters: tuple[str, Code]) -> None:
    """Write dead letters as a worker does (a second write of one is a repeated failure)."""
    outcomes = []
    for uri, code in letters:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        outcomes.append(Outcome(ImageRef(uri, bucket=bucket, key=key), error_for(code)))
    ResultWriter(db, CONFIG).save(outcomes, job_id="job-1")


def failure_rows(db: Engine) -> dict[str, Any]:
    """Each dead letter's replay bookkeeping, by URI."""
    with db.connect() as conn:
        return {
            r.uri: r
            for r in conn.execute(
                select(Image.uri, Failure.replays, Failure.replay_job, Failure.last_seen).join(
                    Failure
                )
            )
        }


def queued_jobs(p: Pipeline) -> dict[str, list[str]]:
    """Job id -> image URIs of every message in the test's queue (read, not consumed)."""
    jobs = {}
    for raw in p.redis().lrange(p.queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        jobs[body["id"]] = [item[0] for item in body["images"]]
    return jobs


def dlq(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """`capworks dlq ...` as a user runs it, from a script (stdin is not a terminal)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "capworks"), "dlq", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=p.env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture()
def pg(pg_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with own_queue(pg_url, tmp_path) as p:
        yield p


@pytest.fixture()
def any_db(any_db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with own_queue(any_db_url, tmp_path) as p:
        yield p


def queued_models(p: Pipeline) -> dict[tuple[str, ...] | None, list[str]]:
    """The model each queued job names (None: any model) -> its image URIs."""
    jobs: dict[tuple[str, ...] | None, list[str]] = {}
    for raw in p.redis().lrange(p.queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        model = tuple(body["model"]) if "model" in body else None
        jobs.setdefault(model, []).extend(item[0] for item in body["images"])
    return jobs


# The replay decision, branch by branch (no server).

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def letter(
    uri: str,
    code: str = "not_found",
    replay_job: str | None = None,
    last_seen: datetime = T0,
    last_replayed: datetime | None = None,
) -> DeadLetter:
    return DeadLetter(1, ImageRef(uri), code, last_seen, replay_job, last_replayed)


def test_a_letter_never_replayed_is_replayed() -> None:
    plan = plan_replay([letter(GONE)], was_sent=lambda _: False, include_poison=False)
    assert [d.ref.uri for d in plan.fresh] == [GONE] and not plan.resend


def test_a_replay_recorded_but_never_sent_is_sent_again_under_its_id() -> None:
    cut_off = letter(GONE, replay_job="r-1", last_replayed=T0 + timedelta(seconds=1))
    plan = plan_replay([cut_off], was_sent=lambda _: False, include_poison=False)
    assert plan.resend == {"r-1": [cut_off]} and not plan.fresh


def test_a_replay_already_sent_is_not_sent_again() -> None:
    sent = letter(GONE, replay_job="r-1", last_replayed=T0 + timedelta(seconds=1))
    plan = plan_replay([sent], was_sent={"r-1"}.__contains__, include_poison=False)
    assert (plan.fresh, plan.resend, plan.already_sent) == ([], {}, 1)


def test_a_letter_that_failed_again_after_its_replay_is_replayed_anew() -> None:
    again = letter(GONE, replay_job="r-1", last_replayed=T0, last_seen=T0 + timedelta(seconds=1))
    plan = plan_replay([again], was_sent={"r-1"}.__contains__, include_poison=False)
    assert plan.fresh == [again] and not plan.resend


def test_poison_is_replayed_only_when_asked_for() -> None:
    poison = letter(KILLER, code="poison")
    assert plan_replay([poison], lambda _: False, include_poison=False).poison == 1
    assert plan_replay([poison], lambda _: False, include_poison=True).fresh == [poison]


# The command against the real servers.


def test_show_prints_the_dead_letter_with_its_replay(pg: Pipeline) -> None:
    fail(connect(pg.db_url), (GONE, Code.NOT_FOUND))
    shown = dlq(pg, "show", GONE)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(": ", 1) for line in shown.stdout.splitlines())
    assert fields["uri"] == GONE and fields["code"] == "not_found"
    assert fields["message"] == "no such object" and fields["job_id"] == "job-1"
    assert (fields["dead-lettered"], fields["replays"], fields["replay_job"]) == (
        "1 time",
        "0",
        "—",
    )
    missing = dlq(pg, "show", "s3://photos/never.jpg")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "capworks: error: no dead letter for s3://photos/never.jpg"


def test_show_and_list_count_tries_and_letters_in_words_that_agree(pg: Pipeline) -> None:
    db = connect(pg.db_url)
    fail(db, (GONE, Code.NOT_FOUND))
    fail(db, (GONE, Code.NOT_FOUND))
    shown = dlq(pg, "show", GONE)
    assert shown.returncode == 0, shown.stderr
    assert "dead-lettered: 2 times" in shown.stdout.splitlines()
    assert "attempts" not in shown.stdout  # the message says how many tries, in its own words
    listed = dlq(pg, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1] == "1 dead letter"
    assert dlq(pg, "purge", "--code", "not_found").stdout.strip() == "purged 1 dead letter"


def test_list_in_80_columns_keeps_every_code_whole_and_every_uri_end(pg: Pipeline) -> None:
    deep = "s3://photos/" + "/".join(["a-rather-long-folder-name"] * 4) + "/the-file-name.jpg"
    fail(connect(pg.db_url), (deep, Code.TOO_LARGE_PIXELS), (GONE, Code.NOT_FOUND))
    pg.extra_env["COLUMNS"] = "80"
    listed = dlq(pg, "list")
    assert listed.returncode == 0, listed.stderr
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    assert "too_large_pixels" in listed.stdout and "not_found" in listed.stdout
    uri_column = "".join(
        line.split("│")[1].strip() for line in listed.stdout.splitlines() if line.startswith("│")
    )
    assert deep in uri_column and GONE in uri_column


def test_purge_deletes_what_the_filters_select(pg: Pipeline) -> None:
    db = connect(pg.db_url)
    old = "s3://photos/old/d.jpg"
    fail(db, (GONE, Code.NOT_FOUND), (BROKEN, Code.UNDECODABLE), (KILLER, Code.POISON))
    fail(db, (old, Code.NOT_FOUND))
    with db.begin() as conn:
        old_id = select(Image.id).where(Image.uri == old).scalar_subquery()
        conn.execute(
            update(Failure)
            .where(Failure.image_id == old_id)
            .values(last_seen=datetime.now(UTC) - timedelta(days=40))
        )
    purged = dlq(pg, "purge", "--older-than", "30d")
    assert purged.stdout.strip() == "purged 1 dead letter", purged.stderr
    assert set(failure_rows(db)) == {GONE, BROKEN, KILLER}
    assert dlq(pg, "purge", "--code", "undecodable").returncode == 0
    assert set(failure_rows(db)) == {GONE, KILLER}
    assert dlq(pg, "purge", "--prefix", "s3://photos/killer/").returncode == 0
    assert set(failure_rows(db)) == {GONE}


def test_older_than_counts_on_the_databases_clock_not_the_writers(
    pg: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock is an hour behind writes a dead letter now: `--older-than 30m`
    (on the database's clock) must not take it for an hour-old one."""
    from capworks.workers import persist

    monkeypatch.setattr(persist, "utcnow", lambda: datetime.now(UTC) - timedelta(hours=1))
    db = connect(pg.db_url)
    fail(db, (GONE, Code.NOT_FOUND))
    listed = dlq(pg, "list", "--older-than", "30m", "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "", listed.stdout
    seen = failure_rows(db)[GONE].last_seen
    assert abs((seen - datetime.now(UTC)).total_seconds()) < 60


def test_purge_without_a_filter_refuses_unless_all_and_yes(pg: Pipeline) -> None:
    db = connect(pg.db_url)
    fail(db, (GONE, Code.NOT_FOUND), (BROKEN, Code.UNDECODABLE))
    for args in ([], ["--all"], ["--yes"], ["--prefix", ""]):
        refused = dlq(pg, "purge", *args)
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "--all --yes" in refused.stderr, refused.stderr
        assert set(failure_rows(db)) == {GONE, BROKEN}
    everything = dlq(pg, "purge", "--all", "--yes")
    assert everything.stdout.strip() == "purged 2 dead letters", everything.stderr
    assert failure_rows(db) == {}


def test_a_replay_run_twice_publishes_once(pg: Pipeline) -> None:
    db = connect(pg.db_url)
    fail(db, (GONE, Code.NOT_FOUND), (BROKEN, Code.UNDECODABLE))
    first = dlq(pg, "replay", "--rate", "1000/s")
    assert first.returncode == 0 and "replayed 2 " in first.stdout, first.stderr
    second = dlq(pg, "replay", "--rate", "1000/s")
    assert second.returncode == 0 and "replayed 0 " in second.stdout, second.stderr
    assert "skipped 2 replayed before and not failed since" in second.stdout
    jobs = queued_jobs(pg)
    assert list(jobs.values()) == [[BROKEN, GONE]] or list(jobs.values()) == [[GONE, BROKEN]]
    letters = failure_rows(db)
    assert {letters[u].replays for u in (GONE, BROKEN)} == {1}
    assert {letters[u].replay_job for u in (GONE, BROKEN)} == set(jobs)


def test_the_replays_counter_counts_each_replay_of_a_letter_that_failed_again(
    pg: Pipeline,
) -> None:
    db = connect(pg.db_url)
    fail(db, (GONE, Code.NOT_FOUND))
    assert dlq(pg, "replay").returncode == 0
    first_job = failure_rows(db)[GONE].replay_job
    fail(db, (GONE, Code.NOT_FOUND))  # the replayed job ran and the object is still missing
    assert dlq(pg, "replay").returncode == 0
    letter_now = failure_rows(db)[GONE]
    assert letter_now.replays == 2
    assert set(queued_jobs(pg)) == {first_job, letter_now.replay_job}
    assert dlq(pg, "list", "--json").stdout.count('"replays": 2') == 1


def test_poison_is_skipped_unless_asked_for_by_code(pg: Pipeline) -> None:
    fail(connect(pg.db_url), (GONE, Code.NOT_FOUND), (KILLER, Code.POISON))
    plain = dlq(pg, "replay")
    assert plain.returncode == 0, plain.stderr
    assert "skipped 1 poison (replay them with --code poison)" in plain.stdout
    assert list(queued_jobs(pg).values()) == [[GONE]]
    asked = dlq(pg, "replay", "--code", "poison")
    assert asked.returncode == 0 and "replayed 1 " in asked.stdout, asked.stderr
    assert sorted(queued_jobs(pg).values()) == [[GONE], [KILLER]]


def refuse(_body: dict[str, Any]) -> None:
    raise ConnectionError("the broker went away")


def test_a_replay_cut_off_before_publishing_is_sent_by_the_next_run_under_the_same_id(
    any_db: Pipeline,
) -> None:
    db = connect(any_db.db_url)
    fail(db, (GONE, Code.NOT_FOUND), (BROKEN, Code.UNDECODABLE))
    cut_off = Publisher(refuse, any_db.redis(), any_db.queue, job_images=64)
    with pytest.raises(ConnectionError):
        replay(db, cut_off, Selection(), rate_per_s=1000, job_images=64, max_queued_images=1000)
    recorded = failure_rows(db)
    replay_job = recorded[GONE].replay_job
    assert replay_job is not None and recorded[BROKEN].replay_job == replay_job
    assert recorded[GONE].replays == 1 and queued_jobs(any_db) == {}

    publisher = make_publisher(Settings(broker_url=REDIS_URL, queue_name=any_db.queue))
    counts = replay(
        db, publisher, Selection(), rate_per_s=1000, job_images=64, max_queued_images=1000
    )
    assert (counts.replayed, counts.resent) == (0, 2)
    assert {job: sorted(uris) for job, uris in queued_jobs(any_db).items()} == {
        replay_job: sorted([GONE, BROKEN])
    }
    assert {r.replays for r in failure_rows(db).values()} == {1}
    again = replay(
        db, publisher, Selection(), rate_per_s=1000, job_images=64, max_queued_images=1000
    )
    assert (again.replayed, again.resent, again.already_sent) == (0, 0, 2)
    assert len(queued_jobs(any_db)) == 1


def test_replay_waits_while_the_queue_is_full_and_goes_on_when_it_drains(pg: Pipeline) -> None:
    fail(connect(pg.db_url), (GONE, Code.NOT_FOUND))
    pg.extra_env.update(CAPWORKS_JOB_IMAGES="10", CAPWORKS_MAX_QUEUED_IMAGES="10")
    r = pg.redis()
    r.rpush(pg.queue, "someone else's job", "and another")  # 2 jobs x 10 images > 10
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "capworks"), "dlq", "replay"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=pg.env,
        cwd=REPO,
    )
    try:
        time.sleep(6)
        assert proc.poll() is None, proc.communicate()
        assert r.llen(pg.queue) == 2
        r.delete(pg.queue)  # the workers caught up
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "replayed 1 " in out, err
    assert list(queued_jobs(pg).values()) == [[GONE]]


def test_replay_sends_jobs_that_name_each_letters_model(any_db: Pipeline) -> None:
    db = connect(any_db.db_url)
    fail(db, (GONE, Code.NOT_FOUND))
    upgraded = CheckpointConfig(model_dir=Path("."), model_id="m-next", revision="r2")
    wrong = CapworksError(Code.WRONG_MODEL, "job is for m-next; the worker serves m")
    # A worker of the old model dead-letters a job made for the new one under the job's model.
    ResultWriter(db, CONFIG).save([Outcome(ImageRef(BROKEN), wrong)], model=upgraded.identity)
    legacy = "s3://photos/legacy/e.jpg"
    fail(db, (legacy, Code.NOT_FOUND))
    with db.begin() as conn:  # a letter written before letters knew their model
        legacy_id = select(Image.id).where(Image.uri == legacy).scalar_subquery()
        conn.execute(
            update(Failure)
            .where(Failure.image_id == legacy_id)
            .values(model_id="", revision="", settings_hash="")
        )
    replayed = dlq(any_db, "replay", "--rate", "1000/s")
    assert replayed.returncode == 0 and "replayed 3 " in replayed.stdout, replayed.stderr
    assert queued_models(any_db) == {
        CONFIG.identity: [GONE],
        upgraded.identity: [BROKEN],
        None: [legacy],
    }
    listed = [json.loads(line) for line in dlq(any_db, "list", "--json").stdout.splitlines()]
    assert {(d["uri"], d["model_id"]) for d in listed} == {
        (GONE, "m"),
        (BROKEN, "m-next"),
        (legacy, ""),
    }
