"""The worker's write path: caption rows (with their images and tags) upserted per second into
PostgreSQL by `ResultWriter.save`, in job-sized chunks. Goal (issue 3): >= 10,000 rows/s.

    .venv/bin/python bench/db_write.py [--rows 20000] [--chunk 256] [--writers 1,2] [--db URL]

Each writer is its own process with its own connection, as each worker process is; with several
writers they write disjoint images at the same time and the rate is their total. Captions are
varied sentences (a seeded grammar over ~150 words; alternatives differ from the caption in one
word each, as beam hypotheses do), so no cache sees only a handful of strings. Two passes: a
first insert, then the same rows again (a redelivered job).
The default database is a scratch one created on the local PostgreSQL and dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import random
import time
from pathlib import Path
from typing import Any

from scratch_pg import scratch_database

from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.tags import derive_tags
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Alternative, Caption, CaptionedImage
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

SUBJECTS = """man woman boy girl child person skier surfer player dog cat horse cow sheep bird
elephant giraffe zebra bear train bus truck car motorcycle bicycle airplane boat plate pizza
sandwich cake bowl kitchen bathroom bedroom clock sign hydrant bench umbrella kite laptop""".split()
ADJECTIVES = """red blue green white black yellow large small old young tall little brown
wooden empty crowded busy snowy grassy sunny""".split()
ACTIONS = """riding holding standing sitting walking eating playing flying lying looking
parked driving carrying throwing catching waiting""".split()
PLACES = """beach street field table road park kitchen counter grass snow water runway
track sidewalk building fence window room city ocean hill""".split()
PREPOSITIONS = "on in near next to at by under".split()


def caption_with_alternatives(rng: random.Random) -> tuple[str, list[str]]:
    """A COCO-style caption and four beam alternatives, each differing from it in one word,
    as the hypotheses of one beam search do."""
    slots = [
        ["a"],
        ADJECTIVES,
        SUBJECTS,
        ACTIONS,
        PREPOSITIONS,
        ["a", "the"],
        ADJECTIVES,
        PLACES,
    ]
    words = [rng.choice(choices) for choices in slots]
    alternatives = []
    for _ in range(4):
        slot = rng.choice([1, 2, 3, 4, 5, 6, 7])
        variant = list(words)
        variant[slot] = rng.choice(slots[slot])
        alternatives.append(" ".join(variant))
    return " ".join(words), alternatives


def outcome(i: int) -> Outcome:
    """A caption with four alternatives for image i (deterministic in i)."""
    text_, alternatives = caption_with_alternatives(random.Random(i))
    alts = tuple(Alternative(a, -1.0 - j) for j, a in enumerate(alternatives, start=1))
    ref = ImageRef(
        f"s3://photos/bench/{i:08d}.jpg",
        bucket="photos",
        key=f"bench/{i:08d}.jpg",
        etag=f"{i:032x}",
        size_bytes=100_000 + i,
    )
    # Tags are derived when the engine decodes a caption, before the write path.
    tags = tuple(derive_tags([(text_, -0.4), *((a.text, a.score) for a in alts)]))
    return Outcome(ref, CaptionedImage(Caption(text_, -0.4, alts, (0, 1, 2), tags), 640, 480))


def write(url: str, first: int, rows: int, chunk: int, start: Any, finished: Any) -> None:
    """One writer process: build its outcomes, wait for the others, save them chunk by chunk,
    and report when its last commit returned (process start-up and exit are not timed)."""
    engine = connect(url)
    writer = ResultWriter(engine, CheckpointConfig(Path("."), "bench-model", "r1"))
    outcomes = [outcome(i) for i in range(first, first + rows)]
    writer.save(outcomes[:1])  # warm the connection pool outside the timing
    start.wait()
    for n in range(0, len(outcomes), chunk):
        writer.save(outcomes[n : n + chunk])
    finished.put(time.monotonic())  # CLOCK_MONOTONIC: one clock for every process
    engine.dispose()


def run_pass(url: str, writers: int, rows: int, chunk: int, offset: int) -> float:
    """Seconds for `writers` processes to write `rows` caption rows between them."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(writers + 1)
    finished = ctx.Queue()
    share = rows // writers
    procs = [
        ctx.Process(target=write, args=(url, offset + w * share, share, chunk, start, finished))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    start.wait()
    began = time.monotonic()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a writer process failed with exit code {p.exitcode}")
    return max(finished.get() for _ in procs) - began


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--writers", default="1,2", help="comma-separated writer counts")
    parser.add_argument("--db", help="SQLAlchemy URL (default: a scratch PostgreSQL database)")
    args = parser.parse_args()
    results = []
    for offset, writers in enumerate(int(w) for w in args.writers.split(",")):
        with contextlib.ExitStack() as stack:
            url = args.db or stack.enter_context(scratch_database())
            connect(url).dispose()  # run the migrations once, before the writers start
            first = offset * args.rows * 2  # each writer count gets images of its own
            for label in ("insert", "re-write"):
                elapsed = run_pass(url, writers, args.rows, args.chunk, first)
                results.append((writers, label, elapsed, args.rows / elapsed))
    print("| writers | pass | caption rows | chunk | seconds | rows/s | vs goal 10,000/s |")
    print("|---|---|---|---|---|---|---|")
    for writers, label, elapsed, rate in results:
        print(
            f"| {writers} | {label} | {args.rows:,} | {args.chunk} | {elapsed:.2f} | "
            f"{rate:,.0f} | {rate / 10000:.2f}x |"
        )


if __name__ == "__main__":
    main()
