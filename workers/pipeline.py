"""One-shot mode (`capworks caption`): references from a reader through the same image path the
worker runs (fetch -> decode -> batcher, in this process), written chunk by chunk.

Two chunks are in flight at once, so the next chunk is fetched and decoded while the model
captions this one, and each chunk is committed, in order, as soon as it is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

from capworks.schema.uris import ImageRef
from capworks.workers.engine import CaptionedImage
from capworks.workers.imagepath import ImagePath
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter

CHUNKS_IN_FLIGHT = 2


def chunked(items: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    """Consecutive lists of at most `size` items."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def caption_refs(
    refs: Iterable[ImageRef],
    path: ImagePath,
    writer: ResultWriter,
    chunk_size: int,
    on_chunk: Callable[[list[Outcome[CaptionedImage]]], None] | None = None,
) -> list[Outcome[CaptionedImage]]:
    """Caption and persist every reference, `chunk_size` at a time; returns all outcomes."""
    every: list[Outcome[CaptionedImage]] = []
    pending: deque[Future[list[Outcome[CaptionedImage]]]] = deque()

    def commit_oldest() -> None:
        outcomes = pending.popleft().result()
        writer.save(outcomes)
        every.extend(outcomes)
        if on_chunk is not None:
            on_chunk(outcomes)

    with ThreadPoolExecutor(CHUNKS_IN_FLIGHT, "capworks-chunk") as runner:
        for chunk in chunked(refs, chunk_size):
            pending.append(runner.submit(path.caption, chunk))
            if len(pending) >= CHUNKS_IN_FLIGHT:
                commit_oldest()
        while pending:
            commit_oldest()
    return every
