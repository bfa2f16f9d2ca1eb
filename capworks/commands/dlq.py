"""`capworks dlq list|show|replay|purge`: the dead letters kept in the `failures` table."""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from producer.enqueue import make_publisher
from producer.sources import InputError
from schema.db import connect
from schema.jobs import Job
from schema.settings import get_settings
from schema.tables import Failure, Image, utcnow
from schema.uris import ImageRef


def run_dlq(args: argparse.Namespace) -> int:
    """Dispatch a dead-letter action."""
    db = connect(args.db)
    if args.action == "show":
        return show(db, args.uri)
    query = filtered(select(Failure, Image).join(Image), args)
    with Session(db) as session:
        rows = list(session.execute(query.order_by(Failure.last_seen)).all())
    if args.action == "list":
        return list_rows(rows[: args.limit], args.json, total=len(rows))
    if args.action == "replay":
        return replay(db, rows, args.rate)
    ids = [r.Failure.id for r in rows]
    with db.begin() as conn:
        conn.execute(delete(Failure).where(Failure.id.in_(ids)))
    print(f"purged {len(ids)} dead letters")
    return 0


def filtered(query: Any, args: argparse.Namespace) -> Any:
    """Apply --code, --prefix and --older-than."""
    if args.code:
        query = query.where(Failure.code == args.code)
    if args.prefix:
        query = query.where(Image.uri.startswith(args.prefix, autoescape=True))
    if args.older_than is not None:
        query = query.where(Failure.last_seen < utcnow() - timedelta(seconds=args.older_than))
    return query


def list_rows(rows: list[Any], as_json: bool, total: int) -> int:
    """Print dead letters as a table or JSON lines."""
    if as_json:
        for r in rows:
            print(json.dumps(as_dict(r)))
        return 0
    table = Table("uri", "code", "attempts", "last seen", "message", title="dead letters")
    for r in rows:
        d = as_dict(r)
        table.add_row(
            d["uri"], d["code"], str(d["attempts"]), d["last_seen"][:19], d["message"][:60]
        )
    Console().print(table)
    print(f"{total} dead letters" + (f" (showing {len(rows)})" if total > len(rows) else ""))
    return 0


def as_dict(row: Any) -> dict[str, Any]:
    """One dead letter as JSON-able values."""
    f, i = row.Failure, row.Image
    return {
        "uri": i.uri,
        "code": f.code,
        "message": f.message,
        "attempts": f.attempts,
        "first_seen": f.first_seen.isoformat(),
        "last_seen": f.last_seen.isoformat(),
        "job_id": f.job_id,
        "replays": f.replays,
        "traceback": f.traceback,
    }


def show(db: Any, uri: str) -> int:
    """Print everything about one dead letter."""
    with Session(db) as session:
        row = session.execute(select(Failure, Image).join(Image).where(Image.uri == uri)).first()
    if row is None:
        raise InputError(f"no dead letter for {uri}")
    for key, value in as_dict(row).items():
        print(f"{key}: {value}")
    return 0


def replay(db: Any, rows: list[Any], rate_per_s: float) -> int:
    """Enqueue dead letters again at a bounded rate and record that they were replayed."""
    settings = get_settings()
    publisher = make_publisher(settings)
    started = time.monotonic()
    size = max(1, min(settings.job_images, int(rate_per_s)))
    for n in range(0, len(rows), size):
        chunk = rows[n : n + size]
        refs = [
            ImageRef(
                uri=r.Image.uri,
                bucket=r.Image.bucket,
                key=r.Image.key,
                version_id=r.Image.version_id,
                etag=r.Image.etag,
            )
            for r in chunk
        ]
        # Pace by images: the n-th image leaves no sooner than n / rate seconds after the start.
        time.sleep(max(0.0, started + n / rate_per_s - time.monotonic()))
        publisher.publish(Job.new(refs))
        with db.begin() as conn:
            conn.execute(
                update(Failure)
                .where(Failure.id.in_([r.Failure.id for r in chunk]))
                .values(replays=Failure.replays + 1, last_replayed=utcnow())
            )
    print(f"replayed {len(rows)} dead letters at up to {rate_per_s:g}/s")
    return 0
