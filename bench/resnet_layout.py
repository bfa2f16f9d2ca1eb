"""Which ResNet forward is fastest on this CPU: ModelScope's module in NCHW or channels_last, and
our `ResNetPass` (folded BatchNorm) in NCHW or channels_last, with or without oneDNN's fused
ReLU / residual additions. Variants run in turn, round after round, on the same images.

    python bench/resnet_layout.py [--model tiny-random] [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence

import torch

from capworks.checkpoints.build import ensure_checkpoint
from capworks.schema.checkpoint import OFFLINE_NAMES, resolve_checkpoint
from capworks.schema.settings import get_settings
from capworks.workers.generators.resnet_pass import ResNetPass
from capworks.workers.ofa_model import load_model


def main(argv: Sequence[str] | None = None) -> int:
    """Time the variants and print seconds per image and the speed-up over ModelScope's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    checkpoint_dir = get_settings().checkpoint_dir
    if args.model in OFFLINE_NAMES:
        ensure_checkpoint(args.model, checkpoint_dir)
    config = resolve_checkpoint(args.model, None, checkpoint_dir)
    resnet = load_model(config, torch.device("cpu"), torch.float32).encoder.embed_images
    size = config.patch_image_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    nhwc_module = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ModelScope module, NCHW": resnet,
        "ModelScope module, channels_last": lambda x: nhwc_module(
            x.contiguous(memory_format=torch.channels_last)
        ),
        "folded BN, NCHW": ResNetPass(resnet, channels_last=False, fuse=False),
        "folded BN, channels_last": ResNetPass(resnet, channels_last=True, fuse=False),
        "folded BN, channels_last, fused": ResNetPass(resnet, channels_last=True, fuse=True),
    }
    seconds = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        want = resnet(images)
        print(f"ResNet outputs up to {float(want.abs().max()):.0f}")
        for name, fn in variants.items():
            diff = float((fn(images) - want).abs().max())
            print(f"{name:<34} max difference {diff:.1e}")
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(images)
                seconds[name] += time.perf_counter() - start
    base = seconds["ModelScope module, NCHW"]
    count = args.batch * args.rounds
    print(f"\n{config.model_id}, {size} px, batch {args.batch}, {args.rounds} rounds")
    for name, s in seconds.items():
        print(f"{name:<34} {s / count:7.3f} s/image  {base / s:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
