"""Benchmark our encoder pass: the reference generator, the fast generator on ModelScope's encoder,
and the fast generator on our encoder, in one run on the same pixels, against this machine's limit.

    python bench/encoder.py [--model tiny-random] [--batch 8] [--images 32] [--threads N]

The three generators run batch by batch in turn (reference, fast on ModelScope's encoder, fast),
so that a change in the load of a shared machine hits them alike; one warm-up batch each is not
counted. Printed: images/s and the ratio to the reference, whether the tokens equal the
reference's, the fast generator's split into encoder (ResNet / transformer layers), decoder
set-up, decoder steps and search (a separate pass, with timers), the FLOP of one caption counted
by torch's FlopCounterMode (the fast generator's, and the reference's), and the machine's fp32
matmul GFLOP/s measured before and after, which gives the images/s this CPU allows at best.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from capworks.checkpoints.build import ensure_checkpoint
from capworks.schema.checkpoint import OFFLINE_NAMES, resolve_checkpoint
from capworks.schema.settings import get_settings
from capworks.workers.generators import Generator, Hypothesis
from capworks.workers.generators.encoder import FastEncoder
from capworks.workers.generators.fast import FastGenerator, StageTimer, modelscope_encoder
from capworks.workers.generators.kv_decoder import DecoderState, IncrementalDecoder
from capworks.workers.generators.reference import ReferenceGenerator
from capworks.workers.ofa_model import encode_prompt, load_model, load_tokenizer

log = logging.getLogger("bench.encoder")
MATMUL_N = 2048


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="offline name or checkpoint folder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=32, help="images measured per generator")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def matmul_gflops(seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of a 2048-square matrix product on this machine (best of ~`seconds`)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    a @ b
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_N**3 / best / 1e9


def _fused_conv_flop(x: Any, second: Any, third: Any, *args: Any, out_shape: Any, **kw: Any) -> int:
    """2 x output elements x multiply-adds per output element; `_convolution_pointwise` takes
    (x, weight, bias, ...) and its `.binary` overload (x, other, weight, bias, ...)."""
    weight = third if third is not None and len(third) == 4 else second
    return int(2 * math.prod(out_shape) * math.prod(weight[1:]))


def _sdpa_cpu_flop(q: Any, k: Any, v: Any, *args: Any, out_shape: Any, **kw: Any) -> int:
    """q @ k^T and probabilities @ v."""
    batch, heads, queries, dim = q
    return int(2 * batch * heads * queries * k[-2] * (dim + v[-1]))


# Operators FlopCounterMode has no formula for (it looks formulas up by overload packet):
# oneDNN's fused convolutions and the CPU flash-attention kernel.
EXTRA_FLOP_FORMULAS: dict[Any, Any] = {
    torch.ops.mkldnn._convolution_pointwise: _fused_conv_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
}


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of the matrix products, attention and convolutions `fn` runs (FlopCounterMode)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return float(counter.get_total_flops()) / 1e9


class TimedEncoder:
    """Our encoder with its ResNet timed as a stage of its own."""

    def __init__(self, encoder: FastEncoder, timer: StageTimer) -> None:
        self.encoder, self.timer = encoder, timer
        resnet = encoder.resnet

        def timed_resnet(images: torch.Tensor) -> torch.Tensor:
            with timer.stage("resnet", images.device):
                return resnet(images)

        self._resnet = resnet
        self.encoder.resnet = timed_resnet  # type: ignore[assignment]

    def __call__(self, input_ids: torch.Tensor, patch_images: torch.Tensor) -> Any:
        """Encode, timed as a whole too."""
        with self.timer.stage("encoder total", patch_images.device):
            return self.encoder(input_ids, patch_images)

    def restore(self) -> None:
        """Put the untimed ResNet back."""
        self.encoder.resnet = self._resnet


class TimedSetUpDecoder(IncrementalDecoder):
    """The decoder with its per-batch set-up timed as a stage."""

    def __init__(self, decoder: Any, timer: StageTimer) -> None:
        super().__init__(decoder)
        self.timer = timer

    def start(self, encoder_out: Any, beam: int, positions: int) -> DecoderState:
        """The caches of a batch, timed."""
        with self.timer.stage("decoder set-up", encoder_out.last_hidden_state.device):
            return super().start(encoder_out, beam, positions)


def profile_fast(gen: FastGenerator, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """One more pass of the fast generator with stage timers; the split as one line."""
    timer = StageTimer()
    encoder = gen.encoder
    assert isinstance(encoder, FastEncoder)
    timed = TimedEncoder(encoder, timer)
    decoder = gen.decoder
    gen.encoder, gen.decoder, gen.timer = timed, TimedSetUpDecoder(decoder.decoder, timer), timer
    start = time.perf_counter()
    try:
        for ids, pixels in batches:
            gen.generate(ids, pixels)
    finally:
        timed.restore()
        gen.encoder, gen.decoder, gen.timer = encoder, decoder, None
    total = time.perf_counter() - start
    s = timer.seconds
    # The generator's "encoder" stage holds our encoder and the decoder's set-up.
    parts = {
        "encoder": s["encoder total"],
        "  of which ResNet": s["resnet"],
        "  of which transformer layers": s["encoder total"] - s["resnet"],
        "decoder set-up": s["decoder set-up"],
        "decoder steps": s["decoder"],
        "search": s["search"],
    }
    return "\n".join(f"  {k:<30} {v:7.2f} s  {100 * v / total:5.1f}%" for k, v in parts.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint_dir = get_settings().checkpoint_dir
    if args.model in OFFLINE_NAMES:
        ensure_checkpoint(args.model, checkpoint_dir)
    config = resolve_checkpoint(args.model, None, checkpoint_dir)
    device = torch.device("cpu")
    model = load_model(config, device, torch.float32)
    tokenizer = load_tokenizer(config.model_dir)
    prompt = encode_prompt(tokenizer, config.prompt, config.max_src_length)
    size_px = config.patch_image_size
    gen = torch.Generator().manual_seed(args.seed)
    # Normalised noise of growing contrast (captions differ between images); the image path is
    # not what this measures.
    pixels = torch.rand(args.images + args.batch, 3, size_px, size_px, generator=gen) * 2 - 1
    pixels = pixels * torch.linspace(0.3, 1.0, pixels.shape[0])[:, None, None, None]
    batches = [
        (torch.tensor([prompt] * len(chunk)), chunk)
        for chunk in torch.split(pixels, args.batch)
        if len(chunk) == args.batch
    ]
    warm, measured = batches[0], batches[1:]
    images = sum(len(p) for _, p in measured)
    settings = config.generation
    fast = FastGenerator(model, tokenizer, settings)
    generators: dict[str, Generator] = {
        "reference": ReferenceGenerator(model, tokenizer, settings),
        "fast, ModelScope encoder": FastGenerator(
            model, tokenizer, settings, encoder=modelscope_encoder(model)
        ),
        "fast, our encoder": fast,
    }
    print(
        f"model {config.model_id}, {size_px} px, fp32, batch {args.batch}, {images} images, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    gflops_before = matmul_gflops()
    print(f"matmul fp32 {MATMUL_N}^2: {gflops_before:.0f} GFLOP/s")

    seconds = dict.fromkeys(generators, 0.0)
    outputs: dict[str, list[list[Hypothesis]]] = {name: [] for name in generators}
    with torch.inference_mode():
        for g in generators.values():
            g.generate(*warm)
        for ids, chunk in measured:
            for name, g in generators.items():
                start = time.perf_counter()
                outputs[name].extend(g.generate(ids, chunk))
                seconds[name] += time.perf_counter() - start
    gflops_after = matmul_gflops()
    print(f"matmul fp32 {MATMUL_N}^2 after: {gflops_after:.0f} GFLOP/s")

    one_ids, one_px = warm[0][:1], warm[1][:1]
    with torch.inference_mode():
        fast_gflop = count_gflop(lambda: fast.generate(one_ids, one_px))
        ref_gflop = count_gflop(lambda: generators["reference"].generate(one_ids, one_px))
        split = profile_fast(fast, measured)

    ref_rate = images / seconds["reference"]
    print()
    print(f"{'generator':<26} {'images/s':>9} {'seconds':>8} {'x ref':>7}  tokens equal to ref")
    for name in generators:
        rate = images / seconds[name]
        same = sum(
            [h.tokens for h in a] == [h.tokens for h in b]
            for a, b in zip(outputs[name], outputs["reference"], strict=True)
        )
        print(
            f"{name:<26} {rate:>9.3f} {seconds[name]:>8.2f} {rate / ref_rate:>6.2f}x  "
            f"{same}/{images} images"
        )
    gflops = (gflops_before + gflops_after) / 2
    limit = gflops / fast_gflop
    fast_rate = images / seconds["fast, our encoder"]
    print()
    print(
        f"FLOP per caption (FlopCounterMode): fast {fast_gflop:.1f} GFLOP, "
        f"reference {ref_gflop:.1f} GFLOP"
    )
    print(
        f"this CPU's limit at {gflops:.0f} GFLOP/s: {limit:.2f} images/s; "
        f"fast reaches {fast_rate:.2f} images/s = {100 * fast_rate / limit:.0f}% of it "
        f"({fast_rate * fast_gflop:.0f} GFLOP/s)"
    )
    print("fast generator, time by stage (separate timed pass):")
    print(split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
