"""The decode stage (JPEG decode, EXIF, resize, normalise) in images/s, with 1 and 2 workers, as
threads and as processes, on photo-like JPEGs of 640x480 and 2000x1500; and Pillow's draft mode
against the exact path: its speed, and how many tiny-random captions it leaves unchanged.

    .venv/bin/python bench/decode.py [--images 64] [--size 480] [--agreement 32]

Ratios are measured in one run (the machine's speed drifts). Threads share the process's pixels;
processes must send each image's float32 pixels back (2.7 MB at 480 px).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.checkpoint import read_config
from capworks.schema.settings import get_settings
from capworks.workers.engine import OfaEngine
from capworks.workers.preprocess import ExactDecoder, ImageLimits, Normalization, decode_safely


def photo_like(width: int, height: int, seed: int) -> bytes:
    """A JPEG with a photo's statistics: smooth shapes and gradients, fine noise, quality 90."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(smooth).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(pool: Executor, decoder: ExactDecoder, blobs: list[bytes]) -> float:
    """Images/s decoding every blob in the pool (after one warm-up round)."""
    list(pool.map(decode_safely, [decoder] * 4, blobs[:4]))
    started = time.perf_counter()
    out = list(pool.map(decode_safely, [decoder] * len(blobs), blobs))
    elapsed = time.perf_counter() - started
    assert not any(isinstance(o, Exception) for o in out)
    return len(blobs) / elapsed


def measure(kind: str, workers: int, decoder: ExactDecoder, blobs: list[bytes]) -> float:
    """Images/s of one pool kind and size."""
    make: Callable[[int], Executor] = (
        ThreadPoolExecutor if kind == "threads" else ProcessPoolExecutor
    )
    with make(workers) as pool:
        return rate(pool, decoder, blobs)


def agreement(model: str, count: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """Captions that draft mode leaves unchanged, out of `count` shapes scenes enlarged to `size`
    as JPEGs, and how many distinct captions the exact path gave (a model blind to its input,
    as tiny-random's random weights are, would agree trivially)."""
    folder = ensure_checkpoint(model, get_settings().checkpoint_dir)
    engines = [
        OfaEngine.load(read_config(folder, model), device="cpu", batch_size=8, jpeg_draft=draft)
        for draft in (False, True)
    ]
    blobs = []
    for img, _ in sample_scenes(count, seed=77):
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    a, b = ([r.caption.text for r in e.caption_images(blobs)] for e in engines)  # type: ignore[union-attr]
    return sum(x == y for x, y in zip(a, b, strict=True)), count, len(set(a))


def main() -> None:
    """Print the decode table, then the draft-mode agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=480, help="the model's resolution")
    parser.add_argument("--agreement", type=int, default=32, help="images for the caption check")
    parser.add_argument("--model", default="shapes", help="checkpoint for the caption check")
    args = parser.parse_args()
    norm = Normalization(args.size)
    exact = ExactDecoder(ImageLimits(), norm)
    drafted = ExactDecoder(ImageLimits(), norm, jpeg_draft=True)
    print(f"decode stage at {args.size} px, {len(os.sched_getaffinity(0))} cores, images/s")
    print(f"{'source':>10} {'mode':>6} {'workers':>8} {'threads':>9} {'processes':>10} {'t/p':>6}")
    for size in ((640, 480), (2000, 1500)):
        blobs = [photo_like(*size, seed=i) for i in range(args.images)]
        for mode, decoder in (("exact", exact), ("draft", drafted)):
            one_thread = 0.0
            for workers in (1, 2):
                t = measure("threads", workers, decoder, blobs)
                p = measure("processes", workers, decoder, blobs)
                one_thread = one_thread or t
                print(
                    f"{size[0]}x{size[1]:<5} {mode:>6} {workers:>8} {t:>9.1f} {p:>10.1f}"
                    f" {t / p:>6.2f}   (threads x{t / one_thread:.2f} of 1 thread)"
                )
    if args.agreement:
        same, count, distinct = agreement(args.model, args.agreement, (2000, 1500))
        print(
            f"draft mode, 2000x1500 JPEGs, {args.model}: {same}/{count} captions unchanged"
            f" ({distinct} distinct captions on the exact path)"
        )


if __name__ == "__main__":
    main()
