"""A bucket crawl listed by N concurrent ListObjectsV2 streams (`--list-streams N`).

One stream lists ~10-20k keys/s (a page of 1,000 keys per 50-100 ms round trip on AWS): 100M
keys would take hours. The key space under the crawl's prefix is cut into contiguous ranges at
boundaries found by delimiter discovery (the common prefixes of the first levels) or given
(`--prefixes`); the ranges cover every key, so nothing between or outside the prefixes is
missed. Each stream lists one range at a time; the pages of all streams are merged round robin,
so each crawl page, and each job cut from it, mixes keys of many prefixes and the workers' GETs
are spread across them (S3 serves ~5,500 GET/s per prefix).

The resume position after a page is JSON of every range with the last key handed out from it
and whether it is done. Keys are handed out in order within a range, so each range resumes
after its key, and the crawl's exactly-once publishing (a page's jobs recorded before they are
published) holds as it does for one stream.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from producer.sources import InputError, iter_s3
from schema.errors import Code, StorageError
from schema.uris import ImageRef, S3Location, parse_s3, s3_uri

CHUNK = 1000  # keys a stream hands over at once: one ListObjectsV2 page
DISCOVERY_DEPTH = 3  # folder levels delimiter discovery descends at most
DISCOVERY_PAGES = 5  # pages read per folder while discovering (a flat folder is not listed whole)
RANGES_PER_STREAM = 4  # discovery stops once it has this many ranges per stream


@dataclass(frozen=True)
class ListingPlan:
    """How to list a bucket crawl: concurrent streams, and boundaries given instead of found."""

    streams: int = 1
    prefixes: tuple[str, ...] = ()  # relative to the crawl's prefix; empty: discover them


ONE_STREAM = ListingPlan()


@dataclass
class KeyRange:
    """Keys in [lo, hi) under the crawl's prefix, and how far the crawl has handed them out."""

    lo: str | None  # None: from the first key
    hi: str | None  # None: to the last key
    after: str | None = None
    done: bool = False


def is_range_position(position: str | None) -> bool:
    """True for a resume position written by a parallel listing (a plain key otherwise)."""
    return bool(position) and str(position).startswith('{"ranges"')


def ranges_from(boundaries: list[str]) -> list[KeyRange]:
    """Contiguous ranges that cut the key space at each boundary and cover all of it."""
    edges: list[str | None] = [None, *sorted({b for b in boundaries if b}), None]
    return [KeyRange(edges[n], edges[n + 1]) for n in range(len(edges) - 1)]


def encode_position(ranges: list[KeyRange]) -> str:
    """The resume position of a parallel listing."""
    rows = [[r.lo, r.hi, r.after, r.done] for r in ranges]
    return json.dumps({"ranges": rows}, ensure_ascii=False, separators=(",", ":"))


def decode_position(position: str | None, fresh: Callable[[], list[KeyRange]]) -> list[KeyRange]:
    """The ranges to list: from a parallel listing's position, or `fresh()` ones; a plain key
    (a crawl begun with one stream) marks every key up to it as handed out."""
    if is_range_position(position):
        rows = json.loads(str(position))["ranges"]
        return [KeyRange(lo, hi, after, bool(done)) for lo, hi, after, done in rows]
    ranges = fresh()
    if position:
        for r in ranges:
            if r.hi is not None and position >= r.hi:
                r.done = True
            elif r.lo is None or position >= r.lo:
                r.after = position
    return ranges


def discover_boundaries(s3_client: Any, loc: S3Location, want: int, threads: int) -> list[str]:
    """Common prefixes under the crawl's prefix, a level deeper while there are fewer than
    `want` (at most `DISCOVERY_DEPTH` levels), each level's folders asked concurrently."""
    found: list[str] = []
    level = [loc.key]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in range(DISCOVERY_DEPTH):
            children = [
                p for sub in pool.map(lambda p: _folders(s3_client, loc, p), level) for p in sub
            ]
            found.extend(children)
            if not children or len(found) >= want:
                break
            level = children
    return found


def _folders(s3_client: Any, loc: S3Location, prefix: str) -> list[str]:
    """The common prefixes ("folders") directly under `prefix`, from its first pages."""
    paginator = s3_client.get_paginator("list_objects_v2")
    folders: list[str] = []
    try:
        pages = paginator.paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/")
        for number, page in enumerate(pages):
            folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            if number + 1 >= DISCOVERY_PAGES:
                break
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise InputError(f"cannot list {s3_uri(loc.bucket, prefix)}: {code or exc}") from exc
    except BotoCoreError as exc:
        where = s3_uri(loc.bucket, prefix)
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot list {where}: {exc}") from exc
    return folders


def plan_ranges(
    source: str, s3_client: Any, position: str | None, plan: ListingPlan
) -> list[KeyRange]:
    """The ranges of a crawl: those of its resume position, else cut at the given prefixes or
    at discovered ones."""
    loc = parse_s3(source)

    def fresh() -> list[KeyRange]:
        if plan.prefixes:
            return ranges_from([loc.key + p for p in plan.prefixes])
        want = plan.streams * RANGES_PER_STREAM
        return ranges_from(discover_boundaries(s3_client, loc, want, plan.streams))

    return decode_position(position, fresh)


def _just_before(key: str) -> str:
    """A StartAfter for listing from `key` itself: a folder boundary (`a/`) is never an image,
    so listing after it loses nothing; otherwise a string sorting just before it."""
    if key.endswith("/"):
        return key
    last = ord(key[-1]) - 1
    return key[:-1] + (chr(last) if last >= 0 and not 0xD800 <= last <= 0xDFFF else "")


def iter_range(source: str, s3_client: Any, r: KeyRange) -> Iterator[list[ImageRef]]:
    """The objects of one range not yet handed out, in key order, in chunks of a page."""
    start = r.after or (_just_before(r.lo) if r.lo is not None else None)
    chunk: list[ImageRef] = []
    for ref in iter_s3(source, s3_client, start):
        key = ref.key or ""
        if r.hi is not None and key >= r.hi:
            break
        if r.lo is not None and key < r.lo:
            continue
        chunk.append(ref)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# What a stream hands the merger: (range number, a chunk, the end of the range, or its error).
_Item = tuple[int, list[ImageRef] | None | BaseException]


def iter_parallel_pages(
    source: str, s3_client: Any, position: str | None, plan: ListingPlan, page_size: int
) -> Iterator[tuple[str, list[ImageRef]]]:
    """(resume position, page) of a bucket listed by `plan.streams` concurrent streams."""
    ranges = plan_ranges(source, s3_client, position, plan)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for number, r in enumerate(ranges):
        if not r.done:
            todo.put(number)
    out: queue.Queue[_Item] = queue.Queue(maxsize=2 * plan.streams)
    stop = threading.Event()
    streams = [
        threading.Thread(
            target=_stream, args=(source, s3_client, ranges, todo, out, stop), daemon=True
        )
        for _ in range(min(plan.streams, todo.qsize()))
    ]
    for thread in streams:
        thread.start()
    try:
        yield from _merge(ranges, out, plan.streams, page_size)
    finally:
        stop.set()


def _stream(
    source: str,
    s3_client: Any,
    ranges: list[KeyRange],
    todo: queue.SimpleQueue[int],
    out: queue.Queue[_Item],
    stop: threading.Event,
) -> None:
    """One listing stream: ranges from `todo` until none is left or the crawl stops."""
    while not stop.is_set():
        try:
            number = todo.get_nowait()
        except queue.Empty:
            return
        r = ranges[number]
        start = KeyRange(r.lo, r.hi, r.after)  # the merger moves `r.after` on as it hands out
        try:
            for chunk in iter_range(source, s3_client, start):
                if not _put(out, (number, chunk), stop):
                    return
        except Exception as exc:  # noqa: BLE001 - raised again by the merger, in the crawl's thread
            _put(out, (number, exc), stop)  # (a stream that died silently would hang the crawl)
            return
        _put(out, (number, None), stop)


def _put(out: queue.Queue[_Item], item: _Item, stop: threading.Event) -> bool:
    """Wait for room in the merger's queue; False once the crawl has stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _merge(
    ranges: list[KeyRange], out: queue.Queue[_Item], streams: int, page_size: int
) -> Iterator[tuple[str, list[ImageRef]]]:
    """Pages taken round robin, one key at a time, from as many ranges as there are streams
    (or open ranges), each with the position after it: each range's last key handed out, and
    the ranges finished. Chunks are taken from the streams only as keys are handed out, so a
    slow crawl (backpressure) holds the streams instead of buffering the bucket."""
    waiting: dict[int, deque[ImageRef]] = {}
    ended: set[int] = set()
    open_ranges = sum(not r.done for r in ranges)
    page: list[ImageRef] = []
    while open_ranges:
        while len(waiting) < min(streams, open_ranges):
            number, chunk = out.get()
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk is not None:
                waiting.setdefault(number, deque()).extend(chunk)
            elif number in waiting:
                ended.add(number)
            else:
                ranges[number].done, open_ranges = True, open_ranges - 1
        for number in list(waiting):
            ref = waiting[number].popleft()
            page.append(ref)
            ranges[number].after = ref.key
            if not waiting[number]:
                del waiting[number]
                if number in ended:
                    ranges[number].done, open_ranges = True, open_ranges - 1
            if len(page) == page_size:
                yield encode_position(ranges), page
                page = []
    if page:
        yield encode_position(ranges), page
