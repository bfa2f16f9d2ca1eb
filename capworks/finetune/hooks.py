"""Hooks of ours in ModelScope's trainer: per-step progress, and the held-out evaluation each
epoch (the trainer's `EvaluationHook` needs a metric registered for the task; ours scores with
`capworks eval`'s own metrics instead)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority

from capworks.finetune.data import Pair
from capworks.finetune.trainer import EpochReport, OnEpoch, OnStep, PairDataset

log = logging.getLogger(__name__)
Score = Callable[[dict[str, list[str]], dict[str, str]], dict[str, float]]


class ProgressHook(Hook):  # type: ignore[misc]  # ModelScope's hooks are untyped
    """Reports each finished step (step, total, loss) and keeps the loss curve."""

    PRIORITY = Priority.LOW

    def __init__(self, total: int, on_step: OnStep | None, curve: Path | None = None) -> None:
        self.total = total
        self.on_step = on_step
        self.curve = curve  # the loss curve, one JSON line a step, kept across resumed runs
        self.losses: list[tuple[int, float]] = []

    def after_train_iter(self, trainer: Any) -> None:
        """Called by the trainer after every step; `trainer.iter` counts the steps before it."""
        step = trainer.iter + 1
        loss = float(trainer.train_outputs["loss"].detach())
        self.losses.append((step, loss))
        main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.curve is not None and main:
            with self.curve.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        if self.on_step is not None:
            self.on_step(step, self.total, loss)


class HeldOutHook(Hook):  # type: ignore[misc]
    """At each epoch's end: the held-out split's teacher-forced loss (per target token, no label
    smoothing) and, with `score`, eval's metrics of the captions the model now generates."""

    PRIORITY = Priority.VERY_LOW  # after the checkpoint hook: a slow evaluation loses nothing

    def __init__(
        self, pairs: Sequence[Pair], batch_size: int, score: Score | None, on_epoch: OnEpoch | None
    ) -> None:
        self.pairs = list(pairs)
        self.batch_size = batch_size
        self.score = score
        self.on_epoch = on_epoch
        self.reports: list[EpochReport] = []

    def before_run(self, trainer: Any) -> None:
        """The base model's figures (epoch 0), unless the run resumes from a checkpoint."""
        if trainer.iter == 0:
            self._evaluate(trainer, epoch=0)

    def after_train_epoch(self, trainer: Any) -> None:
        """Called by the trainer at each epoch's end."""
        self._evaluate(trainer, epoch=trainer.epoch + 1)

    def _evaluate(self, trainer: Any, epoch: int) -> None:
        """Evaluate on the main process only (every rank holds the same weights)."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        report = evaluate_held_out(trainer, self.pairs, self.batch_size, self.score)
        report.epoch = epoch
        self.reports.append(report)
        log.info("epoch %d held-out loss %.4f %s", report.epoch, report.loss, report.metrics)
        if self.on_epoch is not None:
            self.on_epoch(report)


def held_out_batches(trainer: Any, pairs: Sequence[Pair], batch_size: int) -> list[Any]:
    """The pairs through the trainer's own train preprocessor and collator (targets included)."""
    rows = PairDataset(pairs)
    batches = []
    for start in range(0, len(rows), batch_size):
        samples = [
            trainer.train_preprocessor(rows[i])
            for i in range(start, min(len(rows), start + batch_size))
        ]
        batches.append(trainer.train_data_collator(samples))
    return batches


def evaluate_held_out(
    trainer: Any, pairs: Sequence[Pair], batch_size: int, score: Score | None
) -> EpochReport:
    """Held-out loss and (with `score`) metrics of generated captions, the model left training."""
    from modelscope.utils.data_utils import to_device

    model = trainer.unwrap_module(trainer.model)
    nll, tokens = 0.0, 0
    captions: dict[str, str] = {}
    model.eval()
    try:
        with torch.no_grad():
            start = 0
            for batch in held_out_batches(trainer, pairs, batch_size):
                batch = to_device(batch, trainer.device)
                _, _, logged = trainer.criterion(model, dict(batch))
                count = int(logged["ntokens"])  # nll_loss is the mean over these tokens
                nll += float(logged["nll_loss"]) * count
                tokens += count
                if score is not None:
                    out = model.postprocess(model.inference(batch))
                    uris = [p.uri for p in pairs[start : start + len(out["caption"])]]
                    for uri, caps in zip(uris, out["caption"], strict=True):
                        captions.setdefault(uri, caps[0] if isinstance(caps, list) else caps)
                start += batch["net_input"]["input_ids"].shape[0]
    finally:
        model.train()
    metrics = {}
    if score is not None and captions:
        refs: dict[str, list[str]] = {}
        for pair in pairs:
            refs.setdefault(pair.uri, []).append(pair.caption)
        metrics = score(refs, captions)
    return EpochReport(epoch=0, step=trainer.iter, loss=nll / max(1, tokens), metrics=metrics)
