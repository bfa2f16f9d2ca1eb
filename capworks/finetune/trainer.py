"""Running ModelScope's own OFA trainer (`build_trainer(name=Trainers.ofa)`) on our pairs.

We write the trainer's `configuration.json` (`train` section: optimizer, warm-up schedule,
batch, gradient accumulation, AMP, checkpoints every N steps) and hand it the pairs as a
dataset of `{image, text}` rows; its own `OfaPreprocessor`, label-smoothed criterion, optimizer
hooks, checkpointing and `torchrun` launcher do the rest. Two hooks of ours ride along: the
progress bar and a held-out evaluation at each epoch's end (teacher-forced loss and eval's
metrics on generated captions). A run killed after a checkpoint resumes from
its last one with the trainer's own `train(checkpoint_path=...)` (weights, optimizer, schedule,
step and position in the epoch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from capworks.finetune.data import Pair

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
# The decays ModelScope's OFA trainer builds after the warm-up (its `get_schedule`): to zero in
# a straight line or along a half cosine, or none.
LrSchedule = Literal["linear", "cosine", "const"]
CHECKPOINT_RE = re.compile(r"^iter_(\d+)$")
# The trainer keeps this many step checkpoints (each holds the optimizer's state too).
KEEP_CHECKPOINTS = 2
LOSS_CURVE = "losses.jsonl"  # in the work folder: every step's loss, across resumes


@dataclass(frozen=True)
class TrainOptions:
    """How long and how to train (the `capworks finetune` options)."""

    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    warmup_steps: int = 0
    lr_schedule: LrSchedule = "linear"
    batch_size: int = 8
    grad_accum: int = 1
    precision: Precision = "fp32"
    save_every: int = 50
    seed: int = 42
    label_smoothing: float = 0.1


@dataclass
class EpochReport:
    """The held-out figures after one epoch."""

    epoch: int
    step: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What the run did: steps, the losses per step, and the held-out reports per epoch."""

    steps: int
    resumed_from: int
    losses: list[tuple[int, float]]
    epochs: list[EpochReport]
    output_dir: Path


class PairDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """The pairs as the `{image, text}` rows ModelScope's OFA preprocessor reads."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self._pairs = list(pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self._pairs[index]
        return {"image": pair.image, "text": pair.caption}


def schedule(train_pairs: int, options: TrainOptions, world_size: int) -> tuple[int, int]:
    """(epochs, iterations per epoch): whole passes over the data, or with `max_steps` as many
    passes as reach it, each as long as a pass or `max_steps`, whichever is shorter."""
    per_epoch = max(1, math.ceil(train_pairs / (options.batch_size * world_size)))
    if options.max_steps is None:
        return options.epochs, per_epoch
    iters = min(per_epoch, options.max_steps)
    return math.ceil(options.max_steps / iters), iters


def training_configuration(
    base: dict[str, Any], options: TrainOptions, work_dir: Path, train_pairs: int, world_size: int
) -> dict[str, Any]:
    """The base model's `configuration.json` with the trainer's `train` section."""
    epochs, iters = schedule(train_pairs, options, world_size)
    # OFATrainer sizes its schedule from whole passes: ceil(pairs / batch) x max_epochs.
    planned = math.ceil(train_pairs / (options.batch_size * world_size)) * epochs
    cfg = copy.deepcopy(base)
    cfg.pop("capworks_finetune", None)
    cfg["dataset"] = {"column_map": {"text": "text"}}
    amp = options.precision == "fp16"
    cfg["train"] = {
        "work_dir": str(work_dir),
        "max_epochs": epochs,
        "train_iters_per_epoch": iters,
        "use_fp16": amp,
        "dataloader": {"batch_size_per_gpu": options.batch_size, "workers_per_gpu": 0},
        "lr_scheduler": {
            "name": options.lr_schedule,
            "warmup_proportion": min(1.0, options.warmup_steps / max(1, planned)),
        },
        "lr_scheduler_hook": {"type": "LrSchedulerHook", "by_epoch": False},
        "optimizer": {"type": "AdamW", "lr": options.lr, "weight_decay": 0.01},
        "optimizer_hook": {
            "type": "TorchAMPOptimizerHook" if amp else "OptimizerHook",
            "cumulative_iters": options.grad_accum,
            "grad_clip": {"max_norm": 1.0, "norm_type": 2},
            "loss_keys": "loss",
        },
        "criterion": {
            "name": "AdjustLabelSmoothedCrossEntropyCriterion",
            "constraint_range": None,
            "drop_worst_after": 0,
            "drop_worst_ratio": 0.0,
            "ignore_eos": False,
            "ignore_prefix_size": 0,
            "label_smoothing": options.label_smoothing,
            "reg_alpha": 1.0,
            "report_accuracy": False,
            "sample_patch_num": 196,
            "sentence_avg": False,
            "use_rdrop": False,
        },
        "hooks": [
            {
                "type": "CheckpointHook",
                "by_epoch": False,
                "interval": options.save_every,
                "max_checkpoint_num": KEEP_CHECKPOINTS,
            },
            {"type": "IterTimerHook"},
        ],
    }
    cfg["evaluation"] = {"dataloader": {"batch_size_per_gpu": options.batch_size}}
    return cfg


def last_checkpoint(work_dir: Path) -> tuple[int, Path] | None:
    """(step, path prefix) of the newest complete step checkpoint the trainer saved in
    `work_dir` (`iter_N.pth` and `iter_N_trainer_state.pth`, both whole: torch writes a zip,
    and a file cut short by a kill has no central directory)."""
    found = []
    for state in work_dir.glob("iter_*_trainer_state.pth"):
        match = CHECKPOINT_RE.match(state.name.removesuffix("_trainer_state.pth"))
        weights = work_dir / (state.name.removesuffix("_trainer_state.pth") + ".pth")
        if match and zipfile.is_zipfile(state) and zipfile.is_zipfile(weights):
            found.append((int(match.group(1)), work_dir / f"iter_{match.group(1)}"))
    return max(found) if found else None


OnStep = Callable[[int, int, float], None]  # (step, total steps, loss)
OnEpoch = Callable[[EpochReport], None]


def run_trainer(
    base_dir: Path,
    train: Sequence[Pair],
    held_out: Sequence[Pair],
    options: TrainOptions,
    work_dir: Path,
    score: Callable[[dict[str, list[str]], dict[str, str]], dict[str, float]] | None,
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
) -> TrainResult:
    """Fine-tune the checkpoint in `base_dir` with ModelScope's OFA trainer; resume from the
    newest checkpoint in `work_dir` if there is one. `score` turns (references, captions) into
    eval's metrics for the held-out split."""
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer

    from capworks.finetune.hooks import HeldOutHook, ProgressHook

    world_size = torchrun_world_size()
    work_dir.mkdir(parents=True, exist_ok=True)
    base = json.loads((base_dir / "configuration.json").read_text())
    cfg = training_configuration(base, options, work_dir, len(train), world_size)
    # The trainer copies this file into work_dir as its configuration.json: it must be named
    # so, and live elsewhere.
    cfg_file = work_dir / "config" / "configuration.json"
    cfg_file.parent.mkdir(exist_ok=True)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    resume = last_checkpoint(work_dir)
    kwargs: dict[str, Any] = {
        "model": str(base_dir),
        "work_dir": str(work_dir),
        "cfg_file": str(cfg_file),
        "train_dataset": PairDataset(train),
        "seed": options.seed,
    }
    if torch.distributed.is_torchelastic_launched():
        kwargs["launcher"] = "pytorch"  # the trainer's distributed mode under torchrun
    with no_hub_check():
        trainer = build_trainer(name=Trainers.ofa, default_args=kwargs)
    epochs, iters = schedule(len(train), options, world_size)
    total = epochs * iters
    progress = ProgressHook(total, on_step, work_dir / LOSS_CURVE)
    trainer.register_hook(progress)
    held = HeldOutHook(held_out, options.batch_size, score, on_epoch)
    if held_out:
        trainer.register_hook(held)
    with torch.serialization.safe_globals(checkpoint_globals()):
        trainer.train(checkpoint_path=str(resume[1]) if resume else None)
    return TrainResult(
        steps=trainer.iter,
        resumed_from=resume[0] if resume else 0,
        losses=progress.losses,
        epochs=held.reports,
        output_dir=work_dir / "output",
    )


def checkpoint_globals() -> list[Any]:
    """What the trainer's state file holds besides tensors (numpy's random state): allowed by
    name, so a resume loads it with torch's `weights_only` unpickler, which runs no code."""
    import numpy as np

    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array reconstructor
    return [reconstruct, np.ndarray, np.dtype, *dtypes]


@contextlib.contextmanager
def no_hub_check() -> Iterator[None]:
    """Build the trainer without its hub look-up: for a model given as a loaded object,
    EpochBasedTrainer asks the ModelScope hub whether the local copy is the latest (DNS and
    HTTPS to the hub, retried for about a minute offline). A fine-tune's base is a local folder,
    so nothing may leave the machine: the check is a no-op while the trainer is built."""
    import modelscope.trainers.trainer as epoch_trainer

    saved = epoch_trainer.check_local_model_is_latest
    epoch_trainer.check_local_model_is_latest = lambda *args, **kwargs: None
    try:
        yield
    finally:
        epoch_trainer.check_local_model_is_latest = saved


def torchrun_world_size() -> int:
    """The processes torchrun started (1 without torchrun): the process group does not exist
    until the trainer is built, and OFATrainer sizes its schedule from the same variable."""
    if not torch.distributed.is_torchelastic_launched():
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's contract, not a setting
