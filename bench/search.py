"""`capworks search` query time on a large PostgreSQL table: p50/p95 of `schema.search.search`
(what the command runs, with its SQLAlchemy and driver overhead) for a rare word, a common word
and a two-word phrase. Goal (issue 11): p95 <= 50 ms at --limit 20 with 1,000,000 captions.

    .venv/bin/python bench/search.py [--rows 1000000] [--runs 50] [--limit 20] [--db URL]

Captions are COCO-style sentences from a seeded grammar whose word choices are skewed (the
n-th most common subject about 1/sqrt(n) as often as the first), so the common word ("man")
is in about a fifth of the rows, as "man" is in COCO; each caption has three beam
alternatives differing in one word, and its subjects as tags. Each rare word is planted in
ten rows. Rows are loaded with COPY into a migrated scratch database (dropped afterwards);
the GIN and created indexes are dropped for the load and built again after it, as a bulk
load would, then the table is analysed and one untimed query per kind warms the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from scratch_pg import scratch_database
from sqlalchemy import Engine, text

from capworks.schema.db import connect
from capworks.schema.search import MAX_RANKED, Filters, search

SUBJECTS = """man woman dog cat boy girl person horse train bus car truck bird child skier
surfer player cow sheep elephant giraffe zebra bear motorcycle bicycle airplane boat plate
pizza sandwich cake bowl clock sign hydrant bench umbrella kite laptop""".split()
ADJECTIVES = """white red black young large small blue green old yellow tall little brown
wooden empty crowded busy snowy grassy sunny""".split()
ACTIONS = """standing sitting riding holding walking eating playing flying lying looking
parked driving carrying throwing catching waiting""".split()
PLACES = """street table field beach road grass water snow park kitchen counter runway
track sidewalk building fence window room city ocean hill""".split()
PREPOSITIONS = "on in near next to at by under".split()
RARE = """zeppelin platypus xylophone accordion narwhal gondola sextant quokka theremin
dirigible""".split()
QUERIES = {"rare word": RARE, "common word": ["man"], "two-word phrase": ['"red bus"']}
CHUNK = 50_000


def skewed(rng: random.Random, words: list[str]) -> str:
    """A word, the n-th of the list about 1/sqrt(n) times as often as the first."""
    return words[int(len(words) * rng.random() ** 2)]


def caption(rng: random.Random) -> tuple[str, list[str], dict[str, float]]:
    """A caption, three alternatives each one word away from it, and its tags."""
    slots = [["a"], ADJECTIVES, SUBJECTS, ACTIONS, PREPOSITIONS, ["a"], ADJECTIVES, PLACES]
    words = [skewed(rng, choices) for choices in slots]
    alternatives = []
    for _ in range(3):
        variant = list(words)
        slot = rng.randrange(1, len(slots))
        variant[slot] = skewed(rng, slots[slot])
        alternatives.append(" ".join(variant))
    return " ".join(words), alternatives, {words[2]: 1.0, words[7]: 0.75}


def rows(count: int, seed: int = 11) -> Iterator[tuple[Any, ...]]:
    """(image id, caption text, alternatives JSON, tags JSON) for images 1..count."""
    rng = random.Random(seed)
    every = max(1, count // 10)
    for i in range(1, count + 1):
        text_, alternatives, tags = caption(rng)
        if i % every == 0 or i % every == 1:  # two rare words in each of ten rows
            text_ = f"{text_} and a {RARE[(i // every) % len(RARE)]}"
            alternatives[0] += f" with a {RARE[(i // every + 1) % len(RARE)]}"
        alts = json.dumps([{"text": a, "score": -1.0 - n} for n, a in enumerate(alternatives)])
        yield i, text_, alts, json.dumps(tags)


def load(db: Engine, count: int) -> float:
    """COPY `count` images and captions in; returns the seconds it took, indexes included."""
    started = time.monotonic()
    with db.begin() as conn:
        conn.execute(text("DROP INDEX ix_captions_search, ix_captions_tags, ix_captions_created"))
    raw: Any = db.raw_connection()
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress("loading", *columns) as bar, raw.cursor() as cur:
        task = bar.add_task("rows", total=count)
        batch: list[tuple[Any, ...]] = []
        for row in rows(count):
            batch.append(row)
            if len(batch) == CHUNK or row[0] == count:
                copy_chunk(cur, batch)
                raw.commit()
                bar.advance(task, len(batch))
                batch = []
    raw.close()
    with db.begin() as conn:
        conn.execute(text("CREATE INDEX ix_captions_search ON captions USING gin (search)"))
        conn.execute(text("CREATE INDEX ix_captions_tags ON captions USING gin (tags)"))
        conn.execute(text("CREATE INDEX ix_captions_created ON captions (created)"))
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE images"))
        conn.execute(text("VACUUM ANALYZE captions"))
    return time.monotonic() - started


def copy_chunk(cur: Any, batch: list[tuple[Any, ...]]) -> None:
    """One chunk of images and their captions through COPY."""
    with cur.copy("COPY images (id, uri, bucket, key, first_seen, updated_at) FROM STDIN") as cp:
        for i, *_ in batch:
            key = f"bench/{i:08d}.jpg"
            cp.write_row((i, f"s3://photos/{key}", "photos", key, "now", "now"))
    with cur.copy(
        "COPY captions (image_id, model_id, revision, settings_hash, settings, text, score, "
        "alternatives, tags, created) FROM STDIN"
    ) as cp:
        for i, text_, alts, tags in batch:
            cp.write_row((i, "bench-model", "", "h", "{}", text_, -0.4, alts, tags, "now"))


def time_queries(
    db: Engine, words: list[str], runs: int, limit: int, max_ranked: int | None
) -> list[float]:
    """Milliseconds of `runs` searches, cycling through `words` (one untimed warm-up each)."""
    for word in words:
        search(db, word, Filters(), limit, max_ranked)
    times = []
    for n in range(runs):
        began = time.perf_counter()
        search(db, words[n % len(words)], Filters(), limit, max_ranked)
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    """Load, measure and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--db", help="SQLAlchemy URL of an empty database (default: scratch)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.db or stack.enter_context(scratch_database())
        db = connect(url)
        load_s = load(db, args.rows)
        print(f"loaded {args.rows:,} captions in {load_s:.0f} s (COPY, indexes, analyse)")
        print("| query | example | matching rows | mode | runs | p50 ms | p95 ms | p95 / goal |")
        print("|---|---|---|---|---|---|---|---|")
        for kind, words in QUERIES.items():
            found = search(db, words[0], limit=1, max_ranked=None).ranked
            for cap in (MAX_RANKED, None):
                times = time_queries(db, words, args.runs, args.limit, cap)
                p50 = statistics.median(times)
                p95 = statistics.quantiles(times, n=20)[-1]
                ranked = "--rank-all" if cap is None else f"default (first {cap:,})"
                print(
                    f"| {kind} | {words[0]} | {found:,} | {ranked} | {args.runs} | {p50:.1f} | "
                    f"{p95:.1f} | {p95 / 50:.2f} |"
                )
        db.dispose()


if __name__ == "__main__":
    main()
