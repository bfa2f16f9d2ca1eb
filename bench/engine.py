"""Benchmark the captioning engine: images/s per generator, dtype and batch size.

    python bench/engine.py [--model tiny-random] [--batch-sizes 1,4,8] [--images N] [--compare]
                           [--device cpu|cuda] [--dtypes float32,float16,bfloat16] [--profile]

Synthetic random images are encoded, then preprocessed once (timed on its own line); the table
times `OfaEngine.predict` only (generation, with the batch's transfer to the device), one warm-up
batch excluded. `--compare` runs the reference and the fast generator in the same process on the
same pixels, prints the speed ratio per batch size and checks that the fast generator returned
the reference's tokens. With float32 and a half precision in `--dtypes`, each half-precision
row is also given as a ratio to float32's, with how many images got float32's tokens.
`--profile` splits the fast generator's time into its stages: the encoder (ResNet + transformer
encoder), the decoder's set-up for a batch (cross-attention keys/values projected once per image,
position biases), the decoder steps, and the beam search's bookkeeping and n-gram blocking.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from capworks.checkpoints.build import ensure_checkpoint
from capworks.schema.checkpoint import OFFLINE_NAMES, CheckpointConfig, resolve_checkpoint
from capworks.schema.settings import get_settings
from capworks.workers.engine import OfaEngine
from capworks.workers.generators import Hypothesis, make_generator
from capworks.workers.generators.fast import FastGenerator, StageTimer
from capworks.workers.generators.kv_decoder import DecoderState, IncrementalDecoder
from capworks.workers.preprocess import PreparedImage

log = logging.getLogger("bench.engine")
SET_UP = "cross-attention set-up"
STAGES = ("encoder", SET_UP, "decoder", "search")


@dataclass
class Run:
    """One measured configuration."""

    generator: str
    dtype: str
    batch: int
    images: int
    seconds: float
    peak_mib: float | None
    outputs: list[list[Hypothesis]] = field(repr=False)
    stages: dict[str, float] | None = None

    @property
    def images_per_s(self) -> float:
        """Throughput of the measured batches."""
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="tiny-random",
        help="offline checkpoint name, local folder or hub id (default tiny-random)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--images", type=int, default=16, help="images measured per configuration")
    p.add_argument("--compare", action="store_true", help="measure reference and fast generators")
    p.add_argument(
        "--generator",
        default="reference",
        choices=("reference", "fast"),
        help="the generator measured without --compare",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--profile", action="store_true", help="per-stage split of the fast generator")
    p.add_argument(
        "--autocast",
        default=None,
        choices=("float16", "bfloat16"),
        help="run the fast generator under CUDA autocast to this dtype",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_images(count: int, seed: int) -> list[bytes]:
    """Random-noise JPEGs of a few camera-like sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 600), (512, 512)]
    blobs = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine: OfaEngine, pixels: list[np.ndarray], batch: int, name: str, dtype: str) -> Run:
    """Time `engine.predict` over `pixels` in batches of `batch`, after one warm-up batch."""
    engine.predict(pixels[:batch])
    dev = engine.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    outputs: list[list[Hypothesis]] = []
    sync(dev)
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        outputs.extend(engine.predict(pixels[i : i + batch]))
    sync(dev)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return Run(name, dtype, batch, len(pixels), seconds, peak, outputs)


class TimedSetUpDecoder(IncrementalDecoder):
    """The fast generator's decoder with its per-batch set-up (`start`) timed as a stage."""

    def __init__(self, decoder: Any, timer: StageTimer) -> None:
        super().__init__(decoder)
        self.timer = timer

    def start(self, encoder_out: Any, beam: int, positions: int) -> DecoderState:
        """The caches of a batch, timed as the set-up stage."""
        with self.timer.stage(SET_UP, encoder_out.last_hidden_state.device):
            return super().start(encoder_out, beam, positions)


def profile_stages(engine: OfaEngine, pixels: list[np.ndarray], batch: int) -> dict[str, float]:
    """A second, separate pass of the fast generator with stage timers (they add syncs)."""
    generator = engine.generator
    if not isinstance(generator, FastGenerator):
        raise TypeError("profiling needs the fast generator")
    timer = StageTimer()
    decoder = generator.decoder
    generator.timer = timer
    generator.decoder = TimedSetUpDecoder(decoder.decoder, timer)
    try:
        for i in range(0, len(pixels), batch):
            engine.predict(pixels[i : i + batch])
    finally:
        generator.timer = None
        generator.decoder = decoder
    seconds = dict(timer.seconds)
    # The generator runs the set-up inside its encoder stage: charge it to its own stage only.
    seconds["encoder"] -= seconds.get(SET_UP, 0.0)
    return {name: seconds.get(name, 0.0) for name in STAGES}


def config_for(model: str, revision: str | None) -> CheckpointConfig:
    """Resolve the checkpoint, building an offline one into the cache first if needed."""
    checkpoint_dir = get_settings().checkpoint_dir
    if model in OFFLINE_NAMES:
        ensure_checkpoint(model, checkpoint_dir)
    return resolve_checkpoint(model, revision, checkpoint_dir)


def preprocess(engine: OfaEngine, blobs: list[bytes]) -> list[np.ndarray]:
    """Decode and resize once; prints how long it took."""
    start = time.perf_counter()
    prepared = engine.preprocess(blobs)
    seconds = time.perf_counter() - start
    pixels = [p.pixels for p in prepared if isinstance(p, PreparedImage)]
    if len(pixels) != len(blobs):
        raise RuntimeError(f"{len(blobs) - len(pixels)} synthetic images failed to preprocess")
    print(
        f"preprocess: {len(blobs)} images in {seconds:.3f} s "
        f"({len(blobs) / seconds:.1f} images/s, {engine.config.patch_image_size} px)"
    )
    return pixels


def print_table(runs: list[Run], compare: bool) -> None:
    """The results, one row per configuration, then fast/reference ratios."""
    cuda = any(r.peak_mib is not None for r in runs)
    head = f"{'generator':<14} {'dtype':<9} {'batch':>5} {'images/s':>9} {'seconds':>8}"
    print()
    print(head + (f" {'peak MiB':>9}" if cuda else ""))
    print("-" * (len(head) + (10 if cuda else 0)))
    for r in runs:
        line = (
            f"{r.generator:<14} {r.dtype:<9} {r.batch:>5} {r.images_per_s:>9.2f} {r.seconds:>8.2f}"
        )
        if cuda:
            line += f" {r.peak_mib:>9.0f}" if r.peak_mib is not None else f" {'-':>9}"
        print(line)
    if not compare:
        return
    print()
    print(f"{'generator':<14} {'dtype':<9} {'batch':>5} {'fast/ref':>9}  same tokens as reference")
    by_key = {(r.generator, r.dtype, r.batch): r for r in runs}
    for r in runs:
        ref = by_key.get(("reference", r.dtype, r.batch))
        if not r.generator.startswith("fast") or ref is None:
            continue
        same = sum(
            [h.tokens for h in a] == [h.tokens for h in b]
            for a, b in zip(r.outputs, ref.outputs, strict=True)
        )
        worst = max(
            (
                abs(ha.score - hb.score)
                for a, b in zip(r.outputs, ref.outputs, strict=True)
                for ha, hb in zip(a, b, strict=False)
            ),
            default=0.0,
        )
        ratio = r.images_per_s / ref.images_per_s
        print(
            f"{r.generator:<14} {r.dtype:<9} {r.batch:>5} {ratio:>8.2f}x  "
            f"{same}/{len(r.outputs)} images, max score difference {worst:.1e}"
        )


def print_dtype_ratios(runs: list[Run]) -> None:
    """Each half-precision row's speed against the same generator and batch in float32, and how
    many images got float32's tokens."""
    by_key = {(r.generator, r.dtype, r.batch): r for r in runs}
    rows = [r for r in runs if r.dtype != "float32" and (r.generator, "float32", r.batch) in by_key]
    if not rows:
        return
    print()
    print(f"{'generator':<14} {'dtype':<9} {'batch':>5} {'/float32':>9}  same tokens as float32")
    for r in rows:
        base = by_key[(r.generator, "float32", r.batch)]
        same = sum(
            [h.tokens for h in a] == [h.tokens for h in b]
            for a, b in zip(r.outputs, base.outputs, strict=True)
        )
        ratio = r.images_per_s / base.images_per_s
        print(
            f"{r.generator:<14} {r.dtype:<9} {r.batch:>5} {ratio:>8.2f}x  "
            f"{same}/{len(r.outputs)} images"
        )


def print_profile(runs: list[Run]) -> None:
    """Per-stage seconds of the fast generator."""
    for r in runs:
        if r.stages is None:
            continue
        total = sum(r.stages.values()) or 1.0
        parts = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in r.stages.items())
        print(f"profile {r.generator} {r.dtype} batch {r.batch}: {parts}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    generators = ["reference", "fast"] if args.compare else [args.generator]
    if args.profile and "fast" not in generators:
        generators.append("fast")
    config = config_for(args.model, args.revision)
    blobs = synthetic_images(args.images, args.seed)
    print(
        f"model {config.model_id}, {args.images} images, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )

    runs: list[Run] = []
    pixels: list[np.ndarray] | None = None
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        try:
            engine = OfaEngine.load(
                config,
                device=args.device,
                dtype=dtype,
                generator=generators[0],
                batch_size=max(batch_sizes),
            )
        except ValueError as exc:
            print(f"skipping {dtype}: {exc}")
            continue
        try:
            if pixels is None:
                print(f"device {engine.device}")
                pixels = preprocess(engine, blobs)
            for name in generators:
                engine.generator = make_generator(
                    name, engine.model, engine.tokenizer, config.generation
                )
                label = name
                if name == "fast" and args.autocast:
                    engine.generator = FastGenerator(
                        engine.model,
                        engine.tokenizer,
                        config.generation,
                        autocast_dtype=getattr(torch, args.autocast),
                    )
                    label = f"fast+{args.autocast}"
                for batch in batch_sizes:
                    run = measure(engine, pixels, batch, label, dtype)
                    if args.profile and name == "fast":
                        run.stages = profile_stages(engine, pixels, batch)
                    print(f"  {label} {dtype} batch {batch}: {run.images_per_s:.2f} images/s")
                    runs.append(run)
        finally:
            engine.close()
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print_table(runs, args.compare)
    print_dtype_ratios(runs)
    if args.profile:
        print()
        print_profile(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
