"""`capworks dlq list|show|replay|purge`: the dead letters kept in the `failures` table.

A replay is recorded before it is published: the job id goes on the rows (`replay_job`), then
the job is sent and marked as sent in Redis. A run cut off between the two leaves rows whose
replay job was never marked sent; the next run sends that job again under the same id (workers
drop a job id they have committed). A row whose replay was sent is left alone until it fails
again (`last_seen` after `last_replayed`), so running a replay twice sends nothing twice.

A dead letter names the caption identity it was written for (a `wrong_model` letter: the job's),
and its replay is a job naming that identity: only workers serving it caption the image. A letter
written before letters knew their model (identity "") is replayed as a job any model takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from capworks.plain import counted, plain
from capworks.producer.crawl import Publisher, wait_for_room
from capworks.producer.enqueue import make_publisher
from capworks.producer.sources import InputError
from capworks.schema.db import connect, database_now
from capworks.schema.errors import Code
from capworks.schema.jobs import Job, new_job_id
from capworks.schema.redact import escape_controls
from capworks.schema.settings import get_settings
from capworks.schema.tables import Failure, Image, utcnow
from capworks.schema.uris import ImageRef


@dataclass(frozen=True)
class Selection:
    """Which dead letters an action applies to: --code, --prefix, --older-than."""

    code: str | None = None
    prefix: str | None = None
    older_than_s: float | None = None
    now: datetime | None = None  # what --older-than counts back from: the database's clock

    @property
    def is_everything(self) -> bool:
        """True when no filter narrows the selection."""
        return not (self.code or self.prefix) and self.older_than_s is None

    def apply(self, query: Any) -> Any:
        """`query` (over failures joined to images) narrowed to the selection."""
        if self.code:
            query = query.where(Failure.code == self.code)
        if self.prefix:
            query = query.where(Image.uri.startswith(self.prefix, autoescape=True))
        if self.older_than_s is not None:
            now = self.now or utcnow()
            query = query.where(Failure.last_seen < now - timedelta(seconds=self.older_than_s))
        return query


def run_dlq(args: argparse.Namespace) -> int:
    """Dispatch a dead-letter action."""
    db = connect(args.db)
    if args.action == "show":
        return show(db, args.uri)
    now = database_now(db) if args.older_than is not None else None
    selection = Selection(args.code, args.prefix, args.older_than, now)
    if args.action == "list":
        return list_rows(db, selection, args.limit, args.json)
    if args.action == "purge":
        return purge(db, selection, everything=args.all, yes=args.yes)
    settings = get_settings()
    counts = replay(
        db,
        make_publisher(settings),
        selection,
        rate_per_s=args.rate,
        job_images=settings.job_images,
        max_queued_images=settings.max_queued_images,
    )
    print(counts.summary(args.rate))
    return 0


def list_rows(db: Engine, selection: Selection, limit: int, as_json: bool) -> int:
    """Print the selected dead letters, oldest first, as a table or JSON lines."""
    query = selection.apply(select(Failure, Image).join(Image)).order_by(Failure.last_seen)
    with Session(db) as session:
        total = session.scalar(selection.apply(select(func.count(Failure.id)).join(Image))) or 0
        rows = list(session.execute(query.limit(limit)).all())
    if as_json:
        for r in rows:
            print(json.dumps(as_dict(r)))
        return 0
    # In a narrow terminal a code is never cut and a URI wraps rather than losing its end (the
    # file name); the message gives way first.
    table = Table(title="dead letters")
    table.add_column("uri", overflow="fold", ratio=2)
    table.add_column("code", no_wrap=True)
    table.add_column("times", justify="right", no_wrap=True)  # dead-lettered (tries: message)
    table.add_column("last seen (UTC)", no_wrap=True)
    table.add_column("message", overflow="ellipsis", ratio=1)
    for r in rows:
        d = as_dict(r)
        table.add_row(
            plain(d["uri"]),
            plain(d["code"]),
            str(d["attempts"]),
            d["last_seen"][:16].replace("T", " "),
            plain(d["message"]),
        )
    Console().print(table)
    shown = f" (showing {len(rows)})" if total > len(rows) else ""
    print(counted(total, "dead letter") + shown)
    return 0


def as_dict(row: Any) -> dict[str, Any]:
    """One dead letter as JSON-able values."""
    f, i = row.Failure, row.Image
    return {
        "uri": i.uri,
        "model_id": f.model_id,
        "revision": f.revision,
        "settings_hash": f.settings_hash,
        "code": f.code,
        "message": f.message,
        "attempts": f.attempts,
        "first_seen": f.first_seen.isoformat(),
        "last_seen": f.last_seen.isoformat(),
        "job_id": f.job_id,
        "replays": f.replays,
        "replay_job": f.replay_job,
        "traceback": f.traceback,
    }


def show(db: Engine, uri: str) -> int:
    """Print everything about the dead letters of one image (one per model), a blank line
    between two."""
    query = select(Failure, Image).join(Image).where(Image.uri == uri).order_by(Failure.id)
    with Session(db) as session:
        rows = list(session.execute(query).all())
    if not rows:
        raise InputError(f"no dead letter for {uri}")
    for n, row in enumerate(rows):
        if n:
            print()
        for key, value in as_dict(row).items():  # a traceback keeps its lines, nothing its controls
            if key == "attempts":  # how often it was dead-lettered; the message counts tries
                print(f"dead-lettered: {counted(value, 'time')}")
                continue
            shown = "—" if value is None else str(value)  # "None" read as a value
            print(f"{key}: {escape_controls(shown, newlines=key == 'traceback')}")
    return 0


def purge(db: Engine, selection: Selection, *, everything: bool, yes: bool) -> int:
    """Delete the selected dead letters; all of them only with --all --yes or a terminal's yes."""
    if everything and not selection.is_everything:
        raise InputError("dlq purge: --all deletes every dead letter; drop the filters or --all")
    chosen = selection.apply(select(Failure.id).join(Image))
    if selection.is_everything and not (everything and yes):
        with Session(db) as session:
            total = session.scalar(select(func.count(Failure.id))) or 0
        if not sys.stdin.isatty():
            raise InputError(
                f"dlq purge without --code, --prefix or --older-than deletes all {total} "
                "dead letters; give --all --yes to do that"
            )
        if input(f"delete all {total} dead letters? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    with db.begin() as conn:
        purged = conn.execute(delete(Failure).where(Failure.id.in_(chosen))).rowcount
    print(f"purged {counted(purged, 'dead letter')}")
    return 0


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as a replay sees it."""

    failure_id: int
    ref: ImageRef
    code: str
    last_seen: datetime
    replay_job: str | None
    last_replayed: datetime | None
    # The caption identity the letter was written for; None for a letter from before letters
    # knew their model (its replay may be captioned by any model).
    model: tuple[str, str, str] | None = None


@dataclass
class ReplayPlan:
    """What a replay run does with each selected dead letter."""

    fresh: list[DeadLetter] = field(default_factory=list)  # to replay under a new job
    resend: dict[str, list[DeadLetter]] = field(default_factory=dict)  # cut off: send again
    already_sent: int = 0  # replayed before and not failed since
    poison: int = 0  # skipped: replayed only when asked for by --code poison


def plan_replay(
    letters: Sequence[DeadLetter], was_sent: Callable[[str], bool], include_poison: bool
) -> ReplayPlan:
    """Sort dead letters into fresh replays, cut-off replays to send again, and skips."""
    plan = ReplayPlan()
    for letter in letters:
        if letter.code == Code.POISON.value and not include_poison:
            plan.poison += 1
        elif letter.replay_job is None or (
            letter.last_replayed is not None and letter.last_seen > letter.last_replayed
        ):
            plan.fresh.append(letter)
        elif was_sent(letter.replay_job):
            plan.already_sent += 1
        else:
            plan.resend.setdefault(letter.replay_job, []).append(letter)
    return plan


@dataclass(frozen=True)
class ReplayCounts:
    """What a replay run did."""

    replayed: int
    resent: int
    already_sent: int
    poison: int

    def summary(self, rate_per_s: float) -> str:
        """One line for the terminal."""
        parts = [f"replayed {counted(self.replayed, 'dead letter')} at up to {rate_per_s:g}/s"]
        if self.resent:
            parts.append(f"sent again {self.resent} whose replay was cut off")
        if self.already_sent:
            parts.append(f"skipped {self.already_sent} replayed before and not failed since")
        if self.poison:
            parts.append(f"skipped {self.poison} poison (replay them with --code poison)")
        return "; ".join(parts)


def replay(
    db: Engine,
    publisher: Publisher,
    selection: Selection,
    *,
    rate_per_s: float,
    job_images: int,
    max_queued_images: int,
) -> ReplayCounts:
    """Enqueue the selected dead letters again, at most `rate_per_s` images a second and only
    while the queue has room; each replay is recorded on its rows before it is published."""
    plan = plan_replay(
        load_letters(db, selection), publisher.was_sent, selection.code == Code.POISON.value
    )
    size = max(1, min(job_images, int(rate_per_s)))
    # (job, failures whose replay it records): a cut-off replay was recorded by an earlier run.
    # A job names one model, so each is made of letters of one model (a cut-off one was too).
    jobs: list[tuple[Job, list[int]]] = [
        (Job.new([d.ref for d in letters], job_id=job_id, model=letters[0].model), [])
        for job_id, letters in plan.resend.items()
    ]
    by_model: dict[tuple[str, str, str] | None, list[DeadLetter]] = {}
    for letter in plan.fresh:
        by_model.setdefault(letter.model, []).append(letter)
    for model, letters in by_model.items():
        for n in range(0, len(letters), size):
            chunk = letters[n : n + size]
            job = Job.new([d.ref for d in chunk], job_id=f"replay-{new_job_id()}", model=model)
            jobs.append((job, [d.failure_id for d in chunk]))
    started, sent_images = time.monotonic(), 0
    for job, failure_ids in jobs:
        # Pace by images: the n-th image leaves no sooner than n / rate seconds after the start.
        time.sleep(max(0.0, started + sent_images / rate_per_s - time.monotonic()))
        wait_for_room(publisher, max_queued_images)
        if failure_ids:
            record_replay(db, failure_ids, job.job_id)
        publisher.publish(job)
        sent_images += len(job.images)
    return ReplayCounts(
        len(plan.fresh), sum(map(len, plan.resend.values())), plan.already_sent, plan.poison
    )


def load_letters(db: Engine, selection: Selection) -> list[DeadLetter]:
    """The selected dead letters, oldest first."""
    query = selection.apply(select(Failure, Image).join(Image)).order_by(Failure.last_seen)
    with Session(db) as session:
        return [
            DeadLetter(
                f.id,
                ImageRef(
                    uri=i.uri, bucket=i.bucket, key=i.key, version_id=i.version_id, etag=i.etag
                ),
                f.code,
                f.last_seen,
                f.replay_job,
                f.last_replayed,
                (f.model_id, f.revision, f.settings_hash) if f.model_id else None,
            )
            for f, i in session.execute(query).tuples()
        ]


def record_replay(db: Engine, failure_ids: list[int], job_id: str) -> None:
    """Note on the rows that `job_id` replays them, before the job is published."""
    with db.begin() as conn:
        now = database_now(conn)  # on the connection that writes: no second one
        conn.execute(
            update(Failure)
            .where(Failure.id.in_(failure_ids))
            .values(replays=Failure.replays + 1, last_replayed=now, replay_job=job_id)
        )
