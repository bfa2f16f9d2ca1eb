"""Train the `shapes` checkpoint: a small OFA captioner for the synthetic world in shapes_world.

Teacher forcing on freshly rendered images (decoder input = BOS + caption, target = caption +
EOS, cross-entropy ignoring PAD), AdamW with warm-up and cosine decay, and an early stop once a
held-out set is captioned exactly under teacher forcing. The caller checks the result with the
real generator before the checkpoint is published.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from capworks.checkpoints.layout import TOKENIZER_DIR, ofa_config_kwargs
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.checkpoint import DEFAULT_PROMPT
from capworks.workers.ofa_model import encode_prompt, load_tokenizer
from capworks.workers.preprocess import Normalization, to_pixels

log = logging.getLogger(__name__)

TRAIN_SEED = 1000
VALID_SEED = 5


@dataclass(frozen=True)
class Recipe:
    """How `shapes` is trained: image size, batch, schedule and how often held-out is checked."""

    patch_px: int
    batch: int
    max_steps: int  # training stops earlier once held-out captions are exact twice in a row
    lr: float
    warmup_steps: int
    check_every: int
    # bfloat16 autocast where the CPU has bf16 units (AMX or AVX512-BF16): about half the time
    # of a step on such a CPU; elsewhere bf16 is emulated and slower, so float32 is used.
    bf16: bool = True


RECIPE = Recipe(patch_px=96, batch=16, max_steps=500, lr=3e-4, warmup_steps=40, check_every=50)
PATCH_PX = RECIPE.patch_px


class ShapesBatches:
    """Rendered (pixels, decoder input, target) batches; captions get a leading space."""

    def __init__(self, tokenizer: Any, pool: ThreadPoolExecutor, patch_px: int) -> None:
        self._tok = tokenizer
        self._pool = pool
        self._norm = Normalization(patch_px)

    def make(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`count` samples drawn from `seed` as model-ready tensors."""
        pairs = sample_scenes(count, seed)
        pixels = list(self._pool.map(lambda p: to_pixels(p[0], self._norm), pairs))
        ids = [self._tok(" " + cap, add_special_tokens=False).input_ids for _, cap in pairs]
        width = max(len(i) for i in ids) + 1
        pad, bos, eos = self._tok.pad_token_id, self._tok.bos_token_id, self._tok.eos_token_id
        dec = torch.full((count, width), pad, dtype=torch.long)
        tgt = torch.full((count, width), pad, dtype=torch.long)
        for row, seq in enumerate(ids):
            dec[row, : len(seq) + 1] = torch.tensor([bos, *seq])
            tgt[row, : len(seq) + 1] = torch.tensor([*seq, eos])
        return torch.from_numpy(np.stack(pixels)), dec, tgt


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _forward(
    model: Any, prompt: torch.Tensor, images: torch.Tensor, dec: torch.Tensor, bf16: bool
) -> torch.Tensor:
    masks = torch.ones(images.shape[0], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(
            input_ids=prompt.expand(images.shape[0], -1),
            patch_images=images,
            patch_masks=masks,
            decoder_input_ids=dec,
        )
    return out.logits.float()  # type: ignore[no-any-return]


def train_shapes(
    recipe: Recipe = RECIPE,
    seed: int = 0,
    max_seconds: float | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train and return (model, metrics)."""
    from modelscope.models.multi_modal.ofa import OFAModel
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    torch.manual_seed(seed)
    bf16 = recipe.bf16 and cpu_has_bf16()
    log.info("training in %s", "bfloat16 autocast" if bf16 else "float32")
    tok = load_tokenizer(TOKENIZER_DIR)
    model = OFAModel(OFAConfig(**ofa_config_kwargs("shapes")))
    model.train()
    prompt = torch.tensor([encode_prompt(tok, DEFAULT_PROMPT, max_src_length=256)])
    lr, warmup, max_steps = recipe.lr, recipe.warmup_steps, recipe.max_steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup)))

    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=tok.pad_token_id)
    started = time.monotonic()
    perfect_checks = 0
    step = 0
    valid_exact = 0.0
    with ThreadPoolExecutor(4) as pool:
        batches = ShapesBatches(tok, pool, recipe.patch_px)
        valid = batches.make(256, VALID_SEED)
        upcoming = pool.submit(batches.make, recipe.batch, TRAIN_SEED)
        for step in range(max_steps):
            images, dec, tgt = upcoming.result()
            upcoming = pool.submit(batches.make, recipe.batch, TRAIN_SEED + step + 1)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = _forward(model, prompt, images, dec, bf16)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % recipe.check_every == 0:
                recalibrate_batchnorm(model, prompt, batches, bf16, count=3, seed=10_000 + step)
                valid_exact = teacher_forced_exact(model, prompt, valid, tok.pad_token_id, bf16)
                log.info("step %d loss %.4f valid exact %.3f", step + 1, loss.item(), valid_exact)
                perfect_checks = perfect_checks + 1 if valid_exact == 1.0 else 0
            if on_step is not None:  # (step, loss, held-out exact so far), for a progress bar
                on_step(step, loss.item(), valid_exact)
            if perfect_checks >= 2:
                break
            # No wall-clock budget by default: the checkpoint must not depend on how busy the
            # machine was (a budget once cut a build on a loaded machine short, unpublished).
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                log.warning("stopping at the time budget of %.0f s", max_seconds)
                break
        recalibrate_batchnorm(model, prompt, batches, bf16)
        valid_exact = teacher_forced_exact(model, prompt, valid, tok.pad_token_id, bf16)
    model.eval()
    metrics = {
        "steps": step + 1,
        "train_seconds": round(time.monotonic() - started, 1),
        "final_loss": round(loss.item(), 5),
        "valid_teacher_forced_exact": valid_exact,
        "seed": seed,
        "bf16_used": bf16,
        **asdict(recipe),
    }
    return model, metrics


def recalibrate_batchnorm(
    model: Any,
    prompt: torch.Tensor,
    batches: ShapesBatches,
    bf16: bool,
    count: int = 8,
    seed: int = 50_000,
) -> None:
    """Recompute BatchNorm running statistics for the final weights.

    The running averages trail weights that changed fast during training; at inference they
    are what the ResNet uses, so they are recomputed as plain averages over fresh batches.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i in range(count):
            images, dec, _ = batches.make(32, seed + i)
            _forward(model, prompt, images, dec, bf16)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.train(was_training)


def teacher_forced_exact(
    model: Any,
    prompt: torch.Tensor,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pad: int,
    bf16: bool,
) -> float:
    """Share of samples whose every target token is the argmax under teacher forcing."""
    images, dec, tgt = data
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = _forward(model, prompt, images, dec, bf16).argmax(-1)
    model.train(was_training)
    ok = ((pred == tgt) | (tgt == pad)).all(dim=1)
    return float(ok.float().mean())
