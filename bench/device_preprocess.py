"""Caption agreement of device preprocessing (CAPWORKS_PREPROCESS=gpu) with the exact CPU path.

    python bench/device_preprocess.py [--model shapes] [--images 64] [--device cpu|cuda]

The same JPEGs (synthetic scenes of the shapes world, camera-like sizes) are preprocessed twice:
exactly (Pillow, as ModelScope does) and on the device (`DevicePreprocessor`: torchvision's
batched JPEG decode and torch's bicubic resize). Without a torchvision built for this torch, the
device path is measured as far as it runs here: Pillow's decode, then the device resize
(labelled "resize only"). Both batches are captioned by the fast generator; printed are the
pixel differences in grey levels, the share of identical best captions and of identical tokens,
and the preprocessing rate of each path.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.checkpoint import OFFLINE_NAMES, resolve_checkpoint
from capworks.schema.settings import get_settings
from capworks.workers.device_preprocess import DevicePreprocessor, resize_normalize
from capworks.workers.engine import OfaEngine
from capworks.workers.preprocess import ExactDecoder, ImageLimits, Normalization, decode_image

SIZES = [(640, 480), (480, 640), (800, 600), (512, 512)]


def jpegs(count: int, seed: int) -> list[bytes]:
    """Shapes-world scenes scaled up to camera-like sizes, JPEG quality 90."""
    blobs = []
    for i, (img, _) in enumerate(sample_scenes(count, seed)):
        buf = io.BytesIO()
        img.resize(SIZES[i % len(SIZES)], Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def device_pixels(
    blobs: list[bytes], norm: Normalization, device: torch.device
) -> tuple[torch.Tensor, str]:
    """The device path's batch, and what of it ran."""
    try:
        pre = DevicePreprocessor(ImageLimits(), norm, device)
    except RuntimeError as exc:
        print(f"device decode unavailable ({str(exc).splitlines()[0][:120]})")
        rgb = [
            torch.from_numpy(np.asarray(decode_image(b, ImageLimits()).image).copy())
            .permute(2, 0, 1)
            .to(device)
            for b in blobs
        ]
        return resize_normalize(rgb, norm), "Pillow decode + device resize (resize only)"
    batch = pre.prepare_many(blobs)
    if batch.errors:
        raise RuntimeError(f"{len(batch.errors)} images failed on the device path")
    return batch.pixels, "device decode + device resize"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print its report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    checkpoint_dir = get_settings().checkpoint_dir
    if args.model in OFFLINE_NAMES:
        ensure_checkpoint(args.model, checkpoint_dir)
    config = resolve_checkpoint(args.model, None, checkpoint_dir)
    device = torch.device(args.device)
    engine = OfaEngine.load(config, device=args.device, dtype="float32", batch_size=16)
    norm = Normalization(config.patch_image_size, *config.mean_std)
    blobs = jpegs(args.images, args.seed)
    try:
        start = time.perf_counter()
        exact = [ExactDecoder(ImageLimits(), norm).decode(b).pixels for b in blobs]
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        on_device, label = device_pixels(blobs, norm, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        device_s = time.perf_counter() - start
        std = torch.tensor(norm.std)[:, None, None]
        diff = (on_device.cpu() - torch.from_numpy(np.stack(exact))).abs() * std * 255
        want = [
            c for i in range(0, len(exact), 16) for c in engine.caption_pixels(exact[i : i + 16])
        ]
        got = [
            c
            for i in range(0, len(exact), 16)
            for c in engine.caption_pixels([t.cpu().numpy() for t in on_device[i : i + 16]])
        ]
    finally:
        engine.close()
    same_text = sum(a.text == b.text for a, b in zip(got, want, strict=True))
    same_tokens = sum(a.tokens == b.tokens for a, b in zip(got, want, strict=True))
    n = len(blobs)
    print(f"model {config.model_id}, {config.patch_image_size} px, {n} JPEGs, device {device}")
    print(f"device path: {label}")
    print(
        f"pixels: max {float(diff.max()):.2f} grey levels, mean {float(diff.mean()):.3f}, "
        f"{100 * float((diff > 0.5).float().mean()):.1f}% of values differ"
    )
    print(
        f"captions: {same_text}/{n} best captions identical ({100 * same_text / n:.1f}%), "
        f"{same_tokens}/{n} token sequences identical"
    )
    print(
        f"preprocess: exact {n / exact_s:.1f} images/s (one thread), device path "
        f"{n / device_s:.1f} images/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
