"""Fine-tuning data: `(image, caption)` pairs from the references files `capworks eval` reads,
fetched and decoded through the workers' own fetch and decode path.

Each image is fetched once (`StoreFetcher`: S3, the SSRF guard and the file roots apply) and
decoded and checked by `decode_image`, then resized to the checkpoint's patch size with the same
bicubic resize ModelScope's preprocessor applies (so its own resize is then the identity, and
memory holds small images, not photos). A row whose image cannot be fetched or decoded is
skipped and counted by its error code, never fatal.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from capworks.references import References, load_references
from capworks.schema.errors import CapworksError
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef, is_http, is_s3, local_path, parse_s3

FETCH_THREADS = 8


@dataclass(frozen=True)
class Pair:
    """One training example: an image (already at patch size) and one of its captions."""

    uri: str
    image: Image.Image
    caption: str


@dataclass
class PairSet:
    """The pairs a references file gave, and the images skipped, by error code."""

    pairs: list[Pair]
    images: int
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_uris: dict[str, str] = field(default_factory=dict)  # uri -> "code: reason"

    def to_references(self) -> References:
        """The pairs as eval's references (uri -> captions), for scoring a held-out split."""
        refs: References = {}
        for pair in self.pairs:
            refs.setdefault(pair.uri, []).append(pair.caption)
        return refs


def image_ref(uri: str) -> ImageRef:
    """The reference the fetcher reads (an S3 URI names its bucket and key)."""
    if is_s3(uri):
        loc = parse_s3(uri)
        return ImageRef(uri=uri, bucket=loc.bucket, key=loc.key)
    return ImageRef(uri=uri)


def local_roots(uris: Sequence[str]) -> list[Path]:
    """The local images a references file names: the files this one command may read (as
    `capworks eval --caption` reads its references' images); a worker's roots are not widened."""
    return [local_path(u) for u in uris if not is_s3(u) and not is_http(u)]


def load_pairs(
    references: Path,
    images_root: str | None,
    settings: Settings,
    size_px: int,
    s3_client: Any = None,
    on_image: Callable[[], None] | None = None,
) -> PairSet:
    """Read the references, fetch and decode every image once (in threads), and return the
    pairs of the images that decoded; `on_image` is called after each image (a progress bar)."""
    from capworks.workers.fetch import StoreFetcher

    refs = load_references(references, images_root)
    fetcher = StoreFetcher.from_settings(settings, s3_client, file_roots=local_roots(list(refs)))
    limits = (settings.max_image_bytes, settings.max_image_px)

    def prepare(uri: str) -> Image.Image | CapworksError:
        try:
            return fetch_and_shrink(fetcher, uri, limits, size_px)
        finally:
            if on_image is not None:
                on_image()

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        images = list(pool.map(prepare, refs))
    result = PairSet([], images=len(refs))
    for (uri, captions), image in zip(refs.items(), images, strict=True):
        if isinstance(image, CapworksError):
            result.skipped[image.code.value] += 1
            result.skipped_uris[uri] = f"{image.code.value}: {image.message}"
            continue
        result.pairs.extend(Pair(uri, image, caption) for caption in captions)
    return result


def fetch_and_shrink(
    fetcher: Any, uri: str, limits: tuple[int, int], size_px: int
) -> Image.Image | CapworksError:
    """One image through the fetch and decode path, resized as ModelScope resizes it; the
    failure (with its code) instead of raising."""
    from capworks.workers.fetch import Fetched
    from capworks.workers.preprocess import ImageLimits, decode_image

    try:
        data = fetcher.fetch(image_ref(uri))
        if isinstance(data, Fetched):
            data = data.data
        decoded = decode_image(data, ImageLimits(*limits))
    except CapworksError as exc:
        return exc
    return decoded.image.resize((size_px, size_px), Image.Resampling.BICUBIC)


def split_held_out(
    pairs: Sequence[Pair], fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a seeded share of the images (all captions of an image on one side,
    so no held-out image was trained on)."""
    uris = sorted({p.uri for p in pairs})
    random.Random(seed).shuffle(uris)  # noqa: S311 - a reproducible split, not a secret
    held = set(uris[: round(len(uris) * fraction)]) if fraction > 0 else set()
    return [p for p in pairs if p.uri not in held], [p for p in pairs if p.uri in held]


def data_hash(pairs: Sequence[Pair]) -> str:
    """A short hash of what was trained on (each image's URI and pixels, and its caption), in
    a fixed order: the same data gives the same hash on any host."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: (p.uri, p.caption)):
        digest.update(pair.uri.encode() + b"\0" + pair.caption.encode() + b"\0")
        digest.update(hashlib.sha256(pair.image.tobytes()).digest())
    return digest.hexdigest()[:16]
