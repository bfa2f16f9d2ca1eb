"""Fetch -> caption -> persist for a chunk of image references: the plain function every
front end (the one-shot `capworks caption`, the Celery worker) calls."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

from schema.errors import CapworksError, StorageError
from schema.uris import ImageRef
from workers.engine import OfaEngine
from workers.fetch import Fetcher
from workers.persist import Outcome, ResultWriter


def fetch_many(
    refs: Sequence[ImageRef], fetcher: Fetcher, pool: ThreadPoolExecutor
) -> list[bytes | StorageError]:
    """Fetch several objects in threads; a failure stays in its slot."""

    def one(ref: ImageRef) -> bytes | StorageError:
        try:
            return fetcher.fetch(ref.uri)
        except StorageError as exc:
            return exc

    return list(pool.map(one, refs))


def caption_chunk(
    refs: Sequence[ImageRef], fetcher: Fetcher, engine: OfaEngine, pool: ThreadPoolExecutor
) -> list[Outcome]:
    """Outcomes for a chunk, in order: fetch failures and bad images fail alone."""
    fetched = fetch_many(refs, fetcher, pool)
    good = [i for i, f in enumerate(fetched) if isinstance(f, bytes)]
    results = engine.caption_images([fetched[i] for i in good])  # type: ignore[misc]
    outcomes: list[Outcome | None] = [None] * len(refs)
    for i, result in zip(good, results, strict=True):
        outcomes[i] = Outcome(refs[i], result)
    for i, f in enumerate(fetched):
        if isinstance(f, CapworksError):
            outcomes[i] = Outcome(refs[i], f)
    return [o for o in outcomes if o is not None]


def chunked(items: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    """Consecutive lists of at most `size` items."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def caption_refs(
    refs: Iterable[ImageRef],
    fetcher: Fetcher,
    engine: OfaEngine,
    writer: ResultWriter,
    chunk_size: int,
    on_chunk: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Caption and persist every reference, `chunk_size` at a time; returns all outcomes."""
    every: list[Outcome] = []
    with ThreadPoolExecutor(8, "capworks-fetch") as pool:
        for chunk in chunked(refs, chunk_size):
            outcomes = caption_chunk(chunk, fetcher, engine, pool)
            writer.save(outcomes)
            every.extend(outcomes)
            if on_chunk is not None:
                on_chunk(outcomes)
    return every
