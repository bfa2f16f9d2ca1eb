"""A bucket crawl listed by N concurrent ListObjectsV2 streams (`--list-streams N`).

One stream lists ~10-20k keys/s (a page of 1,000 keys per 50-100 ms round trip on AWS): 100M
keys would take hours. The crawl's prefix is cut into parts by delimiter discovery: a folder
with few enough subfolders is split into its subfolders (each listed whole, or split in turn)
and its own objects (listed with the delimiter, so without the subfolders' keys); every key
belongs to exactly one part. `--prefixes a/,b/` gives the parts instead (only their keys are
crawled). Each stream lists one part at a time; the pages of all streams are merged round
robin, so each crawl page, and each job cut from it, mixes keys of many prefixes and the
workers' GETs are spread across them (S3 serves ~5,500 GET/s per prefix).

With `--list-processes P` the streams run in P processes, each with its own S3 client: one
process parses pages on one core at most (the GIL), about 86k keys/s here. The parts, their
positions and the merge stay in the crawl's process; a listing process only lists the parts it
is handed and sends their chunks back.

Parts are prefixes, never key ranges: key order is the server's own (SeaweedFS puts `cats/...`
before `cats.png`, S3 after), so nothing here compares keys. The resume position after a page
is JSON of every part with the last key handed out from it and whether it is done. Keys are
handed out in the server's order within a part, so each part resumes after its key
(StartAfter), and the crawl's exactly-once publishing (a page's jobs recorded before they are
published) holds as it does for one stream. A resumed crawl asks each split folder for its
subfolders again: one made since the crawl began (whose keys no part covers, the folder's own
part being listed without them) becomes a new part, listed with the others; parts done stay
done.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import pickle
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from capworks.producer.sources import InputError, iter_s3
from capworks.schema.errors import Code, StorageError
from capworks.schema.uris import ImageRef, S3Location, parse_s3, s3_uri

# A crawl makes a few thousand short-lived objects a listed page (parsed fields, references),
# freed by reference counting; at Python's default generation-0 threshold (700) the cyclic
# collector ran twice a page, and a 32-stream listing lost about a quarter of its rate
# (BENCHMARKS.md). Crawling processes collect every 10,000 allocations instead.
CRAWL_GC_THRESHOLDS = (10_000, 10, 10)
CHUNK = 1000  # keys a stream hands over at once: one ListObjectsV2 page
DISCOVERY_DEPTH = 3  # folder levels delimiter discovery descends at most
DISCOVERY_PAGES = 5  # pages read per folder while discovering; a folder with more is not split
PARTS_PER_STREAM = 2  # discovery stops once it has this many parts per stream (a level
# deeper costs a list request per folder: at least a page of keys each)


@dataclass(frozen=True)
class ListingPlan:
    """How to list a bucket crawl: concurrent streams, and prefixes given instead of found;
    with `processes` > 1, the streams run in that many processes, each making its own client
    with `client` (a picklable callable: a spawned process cannot be handed a client)."""

    streams: int = 1
    prefixes: tuple[str, ...] = ()  # relative to the crawl's prefix; empty: discover them
    processes: int = 1
    client: Callable[[], Any] | None = None


ONE_STREAM = ListingPlan()


@dataclass
class Part:
    """The keys under `prefix` (only those directly under it when `flat`), and how far the
    crawl has handed them out."""

    prefix: str
    flat: bool = False
    after: str | None = None
    done: bool = False


def collect_less() -> None:
    """Set this process's cyclic collector to `CRAWL_GC_THRESHOLDS` (for a crawling process)."""
    gc.set_threshold(*CRAWL_GC_THRESHOLDS)


def is_parts_position(position: str | None) -> bool:
    """True for a resume position written by a parallel listing (a plain key otherwise)."""
    return bool(position) and str(position).startswith('{"parts"')


def encode_position(parts: list[Part]) -> str:
    """The resume position of a parallel listing."""
    rows = [[p.prefix, p.flat, p.after, p.done] for p in parts]
    return json.dumps({"parts": rows}, ensure_ascii=False, separators=(",", ":"))


def decode_position(position: str) -> list[Part]:
    """The parts of a parallel listing's resume position."""
    rows = json.loads(position)["parts"]
    return [Part(prefix, bool(flat), after, bool(done)) for prefix, flat, after, done in rows]


def describe_position(position: str) -> str:
    """A resume position for people: a parallel listing's as its parts done and begun."""
    if not is_parts_position(position):
        return repr(position)
    parts = decode_position(position)
    begun = sum(p.after is not None and not p.done for p in parts)
    return f"{sum(p.done for p in parts)} of {len(parts)} prefixes done, {begun} begun"


def discover_parts(s3_client: Any, loc: S3Location, want: int, threads: int) -> list[Part]:
    """Parts covering every key under the crawl's prefix: folders are split into their own
    objects and their subfolders, a level deeper while there are fewer than `want` parts (at
    most `DISCOVERY_DEPTH` levels), each level's folders asked concurrently."""
    split: list[str] = []
    leaves = [loc.key]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in range(DISCOVERY_DEPTH):
            found = list(pool.map(lambda prefix: _folders(s3_client, loc, prefix), leaves))
            deeper: list[str] = []
            for parent, folders in zip(leaves, found, strict=True):
                if folders:
                    split.append(parent)
                    deeper.extend(folders)
                else:
                    deeper.append(parent)
            grew = len(deeper) > len(leaves)
            leaves = deeper
            if not grew or len(split) + len(leaves) >= want:
                break
    return [Part(prefix, flat=True) for prefix in split] + [Part(prefix) for prefix in leaves]


def new_parts(s3_client: Any, loc: S3Location, parts: list[Part], threads: int) -> list[Part]:
    """Parts for the folders made under split folders since `parts` were discovered (none
    when nothing was split: the crawl's one part covers every key)."""
    split = [part.prefix for part in parts if part.flat]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = pool.map(lambda prefix: _folders(s3_client, loc, prefix, None), split)
        folders = {folder for listed in found for folder in listed}
    return [Part(prefix) for prefix in sorted(folders - {part.prefix for part in parts})]


def _folders(
    s3_client: Any, loc: S3Location, prefix: str, max_pages: int | None = DISCOVERY_PAGES
) -> list[str]:
    """The common prefixes ("folders") directly under `prefix`; none when there are more than
    `max_pages` pages (a folder that cannot be split stays one part)."""
    paginator = s3_client.get_paginator("list_objects_v2")
    folders: list[str] = []
    try:
        pages = paginator.paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/")
        for number, page in enumerate(pages):
            if number == max_pages:
                return []
            folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise InputError(f"cannot list {s3_uri(loc.bucket, prefix)}: {code or exc}") from exc
    except BotoCoreError as exc:
        where = s3_uri(loc.bucket, prefix)
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"cannot list {where}: {exc}") from exc
    return folders


def plan_parts(source: str, s3_client: Any, position: str | None, plan: ListingPlan) -> list[Part]:
    """The parts of a crawl: those of its resume position and any folder made since, else the
    given prefixes, else discovered ones."""
    loc = parse_s3(source)
    if position:
        parts = decode_position(position)
        return parts + new_parts(s3_client, loc, parts, plan.streams)
    if plan.prefixes:
        return [Part(loc.key + prefix) for prefix in sorted(set(plan.prefixes))]
    return discover_parts(s3_client, loc, plan.streams * PARTS_PER_STREAM, plan.streams)


def iter_part(bucket: str, s3_client: Any, part: Part) -> Iterator[list[ImageRef]]:
    """The objects of one part not yet handed out, in listing order, in chunks of a page."""
    chunk: list[ImageRef] = []
    for ref in iter_s3(s3_uri(bucket, part.prefix), s3_client, part.after, flat=part.flat):
        chunk.append(ref)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# What a stream hands the merger: (part number, a chunk, the end of the part, or its error).
_Item = tuple[int, list[ImageRef] | None | BaseException]


class _Queue(Protocol):
    """What the streams and the merger need of a queue (a thread's or a process's)."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None: ...


def iter_parallel_pages(
    source: str, s3_client: Any, position: str | None, plan: ListingPlan, page_size: int
) -> Iterator[tuple[str, list[ImageRef]]]:
    """(resume position, page) of a bucket listed by `plan.streams` concurrent streams."""
    parts = plan_parts(source, s3_client, position, plan)
    bucket = parse_s3(source).bucket
    open_numbers = [number for number, part in enumerate(parts) if not part.done]
    streams = min(plan.streams, len(open_numbers))
    if plan.processes > 1 and streams > 1:
        yield from _in_processes(bucket, parts, open_numbers, streams, plan, page_size)
        return
    todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for number in [*open_numbers, *[None] * streams]:  # a None ends each stream
        todo.put(number)
    out: queue.Queue[_Item] = queue.Queue(maxsize=2 * plan.streams)
    stop = threading.Event()
    work = (bucket, s3_client, parts, todo, out, stop)
    for _ in range(streams):
        threading.Thread(target=_stream, args=work, daemon=True).start()
    try:
        yield from _merge(parts, out.get, plan.streams, page_size)
    finally:
        stop.set()


def _in_processes(
    bucket: str,
    parts: list[Part],
    open_numbers: list[int],
    streams: int,
    plan: ListingPlan,
    page_size: int,
) -> Iterator[tuple[str, list[ImageRef]]]:
    """The pages of `iter_parallel_pages`, listed by `streams` streams spread over
    `plan.processes` spawned processes (a fork would copy the crawl's threads and sockets)."""
    if plan.client is None:
        raise ValueError("listing processes need a client factory (ListingPlan.client)")
    ctx = multiprocessing.get_context("spawn")
    todo: Any = ctx.Queue()
    for number in [*open_numbers, *[None] * streams]:
        todo.put(number)
    out: Any = ctx.Queue(maxsize=2 * streams)
    stop = ctx.Event()
    count = min(plan.processes, streams)
    procs = [
        ctx.Process(
            target=_listing_process,
            args=(bucket, parts, todo, out, stop, streams // count + (i < streams % count)),
            kwargs={"client": plan.client},
            daemon=True,
        )
        for i in range(count)
    ]
    for proc in procs:
        proc.start()

    def take() -> _Item:
        """The next item; a listing process that died without a word fails the crawl."""
        while True:
            try:
                return out.get(timeout=1.0)  # type: ignore[no-any-return]
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise StorageError(
                        Code.STORAGE_UNAVAILABLE, f"a listing process died (exit code {dead[0]})"
                    ) from None

    try:
        yield from _merge(parts, take, streams, page_size)
    finally:
        stop.set()
        todo.cancel_join_thread()  # part numbers no process took: not worth a wait
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()


def _listing_process(
    bucket: str,
    parts: list[Part],
    todo: _Queue,
    out: Any,
    stop: Any,
    threads: int,
    client: Callable[[], Any],
) -> None:
    """A listing process: `threads` streams on a client of its own, until `todo` ends."""
    collect_less()
    s3_client = client()
    work = (bucket, s3_client, parts, todo, out, stop, True)
    streams = [threading.Thread(target=_stream, args=work) for _ in range(threads)]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join()
    if stop.is_set():  # the crawl has stopped reading: leave what was not sent
        out.cancel_join_thread()


def _stream(
    bucket: str,
    s3_client: Any,
    parts: list[Part],
    todo: _Queue,
    out: _Queue,
    stop: Any,
    portable: bool = False,
) -> None:
    """One listing stream: parts from `todo` until it hands out None or the crawl stops.
    `portable`: an error is sent as one that pickles (a listing process's go to the crawl's)."""
    while not stop.is_set():
        number = todo.get()
        if number is None:
            return
        part = parts[number]
        start = Part(part.prefix, part.flat, part.after)  # the merger moves `part.after` on
        try:
            for chunk in iter_part(bucket, s3_client, start):
                if not _put(out, (number, chunk), stop):
                    return
        except Exception as exc:  # noqa: BLE001 - raised again by the merger, in the crawl's thread
            _put(out, (number, _portable(exc) if portable else exc), stop)  # (a stream that
            return  # died silently would hang the crawl)
        _put(out, (number, None), stop)


def _portable(exc: Exception) -> Exception:
    """`exc`, or a StorageError saying what it was where it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes, of the line itself
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle
        return StorageError(Code.STORAGE_UNAVAILABLE, f"listing failed: {exc!r}")
    return exc


def _put(out: _Queue, item: _Item, stop: Any) -> bool:
    """Wait for room in the merger's queue; False once the crawl has stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _merge(
    parts: list[Part], take: Callable[[], _Item], streams: int, page_size: int
) -> Iterator[tuple[str, list[ImageRef]]]:
    """Pages taken round robin, one key at a time, from as many parts as there are streams
    (or open parts), each with the position after it: each part's last key handed out, and
    the parts finished. Chunks are taken from the streams only as keys are handed out, so a
    slow crawl (backpressure) holds the streams instead of buffering the bucket."""
    waiting: dict[int, deque[ImageRef]] = {}
    ended: set[int] = set()
    open_parts = sum(not part.done for part in parts)
    page: list[ImageRef] = []
    while open_parts:
        while len(waiting) < min(streams, open_parts):
            number, chunk = take()
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk is not None:
                waiting.setdefault(number, deque()).extend(chunk)
            elif number in waiting:
                ended.add(number)
            else:
                parts[number].done, open_parts = True, open_parts - 1
        for number in list(waiting):
            ref = waiting[number].popleft()
            page.append(ref)
            parts[number].after = ref.key
            if not waiting[number]:
                del waiting[number]
                if number in ended:
                    parts[number].done, open_parts = True, open_parts - 1
            if len(page) == page_size:
                yield encode_position(parts), page
                page = []
    if page:
        yield encode_position(parts), page
