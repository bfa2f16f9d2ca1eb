"""Build offline checkpoints into the cache: `tiny-random`, `tiny-wide`, `large-random` and
trained `shapes`.

Each is written to a temporary folder beside its final place and renamed into place only when
complete (and, for `shapes`, only when it captions held-out images well enough), so a killed
build never leaves a half checkpoint that tests would trust.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from capworks.checkpoints.layout import (
    BUILD_DURATIONS,
    BUILD_VERSIONS,
    configuration_json,
    is_current_build,
    ofa_config_kwargs,
    write_checkpoint,
)
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.checkpoint import OFFLINE_NAMES, read_config
from capworks.schema.errors import CheckpointError

log = logging.getLogger(__name__)

HELD_OUT_SEED = 7
HELD_OUT_COUNT = 200
MIN_HELD_OUT_EXACT = 0.95
RANDOM_SPECS = {
    "tiny-random": ("tiny", 480, 20221),
    "large-random": ("large", 480, 20222),
    "tiny-wide": ("wide", 320, 20223),
}
# tiny-wide's configuration.json differs from the default captioner's in resolution (above),
# normalisation and every generation setting, and its weights are perturbed (below).
WIDE_CONFIGURATION = configuration_json(
    320,
    beam_search={
        "beam_size": 4,
        "max_len_b": 12,
        "min_len": 2,
        "no_repeat_ngram_size": 2,
        "len_penalty": 0.7,
    },
    imagenet_mean_std=True,
)


def ensure_checkpoint(name: str, cache: Path) -> Path:
    """The folder of checkpoint `name`, building it first if the cache holds no current build."""
    if name not in OFFLINE_NAMES:
        raise CheckpointError(f"unknown offline checkpoint {name!r}; use one of {OFFLINE_NAMES}")
    final = cache / name
    if is_current_build(final, name):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache / f".{name}.lock"):
        if is_current_build(final, name):  # another process built it while we waited
            return final
        log.warning("building the %s checkpoint into %s: %s", name, final, BUILD_DURATIONS[name])
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
            work = Path(tmp) / name
            metrics = _build_shapes(work) if name == "shapes" else _build_random(name, work)
            metrics["build_version"] = BUILD_VERSIONS.get(name, 1)
            (work / "build.json").write_text(json.dumps(metrics, indent=2))
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
    log.info("built %s in %s", name, final)
    return final


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_random(name: str, out: Path) -> dict[str, Any]:
    from modelscope.models.multi_modal.ofa import OFAModel
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    arch, size_px, seed = RANDOM_SPECS[name]
    torch.manual_seed(seed)
    model = OFAModel(OFAConfig(**ofa_config_kwargs(arch)))
    configuration = None
    if name == "tiny-wide":
        perturb_norms(model, seed)
        configuration = WIDE_CONFIGURATION
    write_checkpoint(model, out, size_px, configuration)
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "architecture": arch, "seed": seed, "parameters": params}


def perturb_norms(model: Any, seed: int) -> None:
    """Give every BatchNorm, LayerNorm and attention head scale values away from their initial
    ones/zeros (and BatchNorm running statistics), so that an engine that mishandles any of
    them produces different captions."""
    gen = torch.Generator().manual_seed(seed)

    def around(t: torch.Tensor, centre: float, spread: float) -> torch.Tensor:
        return centre + spread * (2 * torch.rand(t.shape, generator=gen) - 1)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                module.weight.copy_(around(module.weight, 1.0, 0.4))
                module.bias.copy_(around(module.bias, 0.0, 0.2))
            if isinstance(module, torch.nn.BatchNorm2d):
                mean, var = module.running_mean, module.running_var
                if mean is not None and var is not None:  # None: a norm without running stats
                    mean.copy_(around(mean, 0.0, 0.2))
                    var.copy_(around(var, 1.2, 0.6))
            c_attn = getattr(module, "c_attn", None)
            if isinstance(c_attn, torch.nn.Parameter):
                c_attn.copy_(around(c_attn, 1.0, 0.4))


def _build_shapes(out: Path) -> dict[str, Any]:
    from capworks.checkpoints.train_shapes import RECIPE, train_shapes

    with TrainingProgress(RECIPE.max_steps, RECIPE.check_every) as progress:
        model, metrics = train_shapes(RECIPE, on_step=progress.step)
    log.warning("checking the shapes checkpoint on %d held-out images", HELD_OUT_COUNT)
    write_checkpoint(model, out, RECIPE.patch_px)
    exact = held_out_exact(out)
    metrics.update(name="shapes", held_out_images=HELD_OUT_COUNT, held_out_exact=exact)
    if exact < MIN_HELD_OUT_EXACT:
        raise CheckpointError(
            f"shapes checkpoint captions only {exact:.1%} of held-out images exactly "
            f"(needs {MIN_HELD_OUT_EXACT:.0%}); not published"
        )
    return metrics


class TrainingProgress:
    """The shapes build's progress: a bar (steps, rate, loss, held-out exact, ETA) on a
    terminal, otherwise one plain line per held-out check, so a log shows it too."""

    def __init__(self, total_steps: int, line_every: int) -> None:
        from rich import progress as rp
        from rich.console import Console

        self._total, self._every = total_steps, line_every
        self._console = Console(stderr=True)
        self._started = time.monotonic()
        self._bar = rp.Progress(
            rp.TextColumn("training shapes"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("{task.fields[rate]:.2f} steps/s, loss {task.fields[loss]:.3f}, "),
            rp.TextColumn("held-out exact {task.fields[exact]:.0%}"),
            rp.TimeElapsedColumn(),
            rp.TextColumn("ETA"),
            rp.TimeRemainingColumn(),
            console=self._console,
            disable=not self._console.is_terminal,
        )
        self._task = self._bar.add_task("train", total=total_steps, loss=0.0, exact=0.0, rate=0.0)

    def __enter__(self) -> TrainingProgress:
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()

    def step(self, step: int, loss: float, exact: float) -> None:
        """Record that training step `step` (0-based) ended with `loss` and held-out `exact`."""
        done = step + 1
        rate = done / max(time.monotonic() - self._started, 1e-9)
        self._bar.update(self._task, completed=done, loss=loss, exact=exact, rate=rate)
        if not self._console.is_terminal and done % self._every == 0:
            eta_s = (self._total - done) / rate
            print(
                f"training shapes: step {done}/{self._total}, {rate:.2f} steps/s, "
                f"loss {loss:.3f}, held-out exact {exact:.0%}, about {eta_s / 60:.1f} min left",
                file=sys.stderr,
                flush=True,
            )


def held_out_exact(model_dir: Path) -> float:
    """Share of held-out synthetic images the checkpoint captions exactly, via the real engine."""
    from capworks.workers.engine import OfaEngine

    engine = OfaEngine.load(read_config(model_dir, "shapes"), device="cpu", batch_size=50)
    try:
        pairs = sample_scenes(HELD_OUT_COUNT, HELD_OUT_SEED)
        results = engine.caption_images([_png(img) for img, _ in pairs])
    finally:
        engine.close()
    hits = sum(
        not isinstance(r, Exception) and r.caption.text == want
        for r, (_, want) in zip(results, pairs, strict=True)
    )
    return hits / len(pairs)


def _png(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
