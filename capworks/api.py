"""The Python API, as ModelScope's `pipeline` users expect it:

    from capworks import Captioner
    with Captioner(model="shapes", device="cpu", batch_size=8) as captioner:
        for result in captioner.caption(["photos/", b"...png bytes...", pil_image]):
            print(result.source, result.caption if result.ok else result.error)

Items go down the very path `capworks caption` runs (`one_shot_path`: fetch -> decode ->
batcher, then `caption_refs` when a database is given): paths, folders, `s3://` prefixes and
http(s) URLs are listed by the command's own reader; bytes and PIL images are served to that
path from memory. `enqueue` sends images to the workers, as `capworks enqueue` does for a list.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Union

from capworks.commands.caption import ModelOptions, one_shot_path
from capworks.models import resolve_model
from capworks.producer.enqueue import enqueue
from capworks.producer.sources import iter_refs
from capworks.schema.db import connect
from capworks.schema.settings import get_settings
from capworks.schema.storage import LazyS3Client
from capworks.schema.uris import ImageRef, is_http, is_s3
from capworks.workers.engine import Alternative, CaptionedImage
from capworks.workers.fetch import Fetched, Fetcher, StoreFetcher
from capworks.workers.guard import IPNetwork
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter
from capworks.workers.pipeline import caption_refs

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Alternative", "CaptionResult", "Captioner", "Item", "enqueue"]

Item = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image"]
MEMORY_SCHEME = "sha256:"  # in-memory images are known by their bytes' hash
# Modes PNG stores as they are; any other PIL mode is converted to RGB, as the model sees it.
PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


@dataclass(frozen=True)
class CaptionResult:
    """What became of one image: its caption, score, the other beam hypotheses and tags, or the
    failure code (`not_found`, `truncated`, `too_large_bytes`, ...) and its message."""

    source: str  # the image's path or URI, or `sha256:<hex>` for bytes and PIL images
    caption: str | None = None
    score: float | None = None
    alternatives: tuple[Alternative, ...] = ()
    tags: dict[str, float] = field(default_factory=dict)
    width_px: int | None = None
    height_px: int | None = None
    error: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the image was captioned."""
        return self.error is None

    @classmethod
    def from_outcome(cls, outcome: Outcome[CaptionedImage]) -> CaptionResult:
        """The result of one outcome of the image path."""
        if isinstance(outcome.result, CaptionedImage):
            cap = outcome.result.caption
            return cls(
                outcome.ref.uri,
                cap.text,
                cap.score,
                cap.alternatives,
                dict(cap.tags),
                outcome.result.width_px,
                outcome.result.height_px,
            )
        return cls(outcome.ref.uri, error=outcome.result.code.value, message=outcome.result.message)


class Captioner:
    """A loaded model and its image path in this process; `caption` may be called many times.
    Calls run one at a time (they share one model); close it, or use it as a context manager,
    to stop its threads."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        generator: str = "fast",
        batch_size: int = 8,
        db: str | None = None,
        allow: Sequence[IPNetwork] = (),
    ) -> None:
        """Load `model` (a ModelScope hub id, a local checkpoint folder or an offline name;
        default `CAPWORKS_MODEL`). With `db` (an SQLAlchemy URL) every result is also written
        there, as `capworks caption` does. `allow`: networks http(s) items may reach besides
        public addresses."""
        self._settings = get_settings()
        name = os.fspath(model) if model is not None else self._settings.model
        self.config = resolve_model(name, revision, self._settings)
        self._s3 = LazyS3Client(self._settings)
        self._allow = tuple(allow)
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._stack = ExitStack()
        options = ModelOptions(device, dtype, generator, batch_size)
        self._path = self._stack.enter_context(
            one_shot_path(self._settings, self.config, self._s3, options, allow=self._allow)
        )
        # Opened once the model has loaded, as the command does.
        self._writer = ResultWriter(connect(db), self.config) if db is not None else None

    def caption(self, items: Item | Iterable[Item]) -> list[CaptionResult]:
        """One result per image, in order (a folder or prefix gives one per image in it); a bad
        image is a result with its error code, never an exception."""
        batch = as_items(items)
        refs: list[ImageRef] = []
        blobs: dict[str, bytes] = {}
        paths: list[Path] = []
        for item in batch:
            if isinstance(item, (bytes, bytearray, memoryview)):
                refs.append(remember(bytes(item), blobs))
            elif isinstance(item, (str, os.PathLike)):
                text = os.fspath(item)
                if not is_s3(text) and not is_http(text):
                    paths.append(Path(text))  # read as given, like the command's inputs
                refs.extend(iter_refs([text], self._s3))
            else:  # a PIL image
                refs.append(remember(png_bytes(item), blobs))
        with self._lock:
            store = StoreFetcher.from_settings(
                self._settings, self._s3, file_roots=paths, allow=self._allow
            )
            self._path.fetcher = MemoryFetcher(blobs, store)
            if self._writer is None:
                outcomes = self._path.caption(refs)
            else:
                outcomes = caption_refs(refs, self._path, self._writer, self._batch_size * 4)
        return [CaptionResult.from_outcome(o) for o in outcomes]

    def close(self) -> None:
        """Stop the model thread and the fetch and decode threads."""
        self._stack.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class MemoryFetcher:
    """The image path's fetcher for one call: in-memory images by their hash, every other
    reference through the store fetcher (file roots, S3, guarded http)."""

    blobs: dict[str, bytes]
    store: Fetcher

    def fetch(self, ref: ImageRef) -> bytes | Fetched:
        """The bytes of an in-memory image, or what the store fetcher reads."""
        data = self.blobs.get(ref.uri)
        return data if data is not None else self.store.fetch(ref)


def as_items(items: Item | Iterable[Item]) -> list[Item]:
    """One image as a list of one, or the images of a collection."""
    from PIL import Image

    if isinstance(items, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [items]
    return list(items)


def remember(data: bytes, blobs: dict[str, bytes]) -> ImageRef:
    """A reference to in-memory bytes, named by their hash, kept in `blobs` for the fetcher."""
    uri = MEMORY_SCHEME + hashlib.sha256(data).hexdigest()
    blobs[uri] = data
    return ImageRef(uri, size_bytes=len(data))


def png_bytes(image: Image.Image) -> bytes:
    """A PIL image as lossless PNG bytes, so it takes the decode step every image takes (the
    model sees the same RGB pixels); a mode PNG cannot store is converted to RGB first."""
    buf = io.BytesIO()
    (image if image.mode in PNG_MODES else image.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()
