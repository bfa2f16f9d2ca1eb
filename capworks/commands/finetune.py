"""`capworks finetune REFERENCES --output DIR`: fine-tune an OFA captioner on `(image, caption)`
pairs with ModelScope's own OFA trainer, and write the result as a new model folder.

The references are what `capworks eval` reads; images go through the workers' fetch and decode
path (unreadable ones are skipped and counted). A held-out share of the images is scored each
epoch with eval's metrics. Checkpoints every N steps; a run started again with the same output
resumes from the last one. Runs in the `train` venv (torchvision): `scripts/install.sh --train`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from capworks.evaluation import TokenizerName
from capworks.finetune.trainer import EpochReport, TrainOptions
from capworks.plain import plain
from capworks.references import load_references

log = logging.getLogger(__name__)
TRAIN_VENV_HINT = (
    "capworks finetune runs ModelScope's OFA trainer, which needs torchvision: build the train "
    "venv with `bash scripts/install.sh --train` and run `.venv-train/bin/capworks finetune`"
)


class FinetuneError(ValueError):
    """A fine-tune that cannot start or produced nothing: one line for the user."""


@dataclass(frozen=True)
class FinetuneRequest:
    """What `capworks finetune` was asked."""

    references: Path
    output: Path
    model: str
    revision: str | None
    options: TrainOptions
    images_root: str | None = None
    held_out: float = 0.1
    work_dir: Path | None = None
    tokenizer: TokenizerName = "auto"
    as_json: bool = False
    show_progress: bool = True


def check_train_venv() -> None:
    """Refuse in one line where the trainer cannot import (no torchvision for this torch)."""
    try:
        import torchvision  # noqa: F401 - only whether it loads
    except (ImportError, OSError, RuntimeError) as exc:
        raise FinetuneError(f"{TRAIN_VENV_HINT} ({type(exc).__name__}: {exc})") from exc


def run_finetune(request: FinetuneRequest) -> int:
    """Load the pairs, train, write the model folder, print what was done."""
    from capworks.evaluation import choose_tokenizer
    from capworks.finetune.data import data_hash, split_held_out
    from capworks.finetune.output import finetune_record, write_model_folder
    from capworks.finetune.trainer import run_trainer
    from capworks.schema.checkpoint import resolve_checkpoint
    from capworks.schema.settings import get_settings

    if not 0 <= request.held_out < 1:
        raise FinetuneError(f"--held-out must be in [0, 1), got {request.held_out}")
    # Bad references fail in one line before anything heavy, in either venv.
    images = len(load_references(request.references, request.images_root))
    check_train_venv()
    # ModelScope's trainer logs its hook table and every save at INFO on its own handler.
    logging.getLogger("modelscope").setLevel(
        logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    )
    tokenizer = choose_tokenizer(request.tokenizer)
    settings = get_settings()
    base = resolve_checkpoint(request.model, request.revision, settings.checkpoint_dir)
    console = Console(stderr=True)
    pairs = fetch_pairs(request, settings, base.patch_image_size, images, console)
    if not pairs.pairs:
        raise FinetuneError(
            f"none of the {pairs.images} images in {request.references} could be fetched and "
            f"decoded ({skipped_text(pairs.skipped)})"
        )
    train, held = split_held_out(pairs.pairs, request.held_out, request.options.seed)
    if not train:
        raise FinetuneError(f"no training pairs left after holding out {request.held_out:.0%}")
    work_dir = request.work_dir or request.output.with_name(request.output.name + ".work")

    def score(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
        from capworks.evaluation import score_captions

        return dict(score_captions(refs, hyps, tokenizer, False).metrics)

    # ModelScope prints notes of its own to stdout; stdout is ours (one JSON object with --json).
    with (
        contextlib.redirect_stdout(sys.stderr),
        training_progress(console, request.show_progress) as (on_step, bar),
    ):
        result = run_trainer(
            base.model_dir,
            train,
            held,
            request.options,
            work_dir,
            score,
            on_step=on_step,
            on_epoch=bar.log_epoch,
        )
    options = asdict(request.options)
    record = finetune_record(
        base,
        data_hash(train),
        result.steps,
        options,
        {
            "held_out_images": len({p.uri for p in held}),
            "train_pairs": len(train),
            "epochs": [asdict(r) for r in result.epochs],
            "skipped": dict(pairs.skipped),
        },
    )
    write_model_folder(result.output_dir, base, record, request.output)
    report = {
        "output": str(request.output),
        "revision": record["revision"],
        "base": record["base"],
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "images": pairs.images,
        "skipped": dict(pairs.skipped),
        "skipped_images": pairs.skipped_uris,
        "train_pairs": len(train),
        "held_out_pairs": len(held),
        "losses": result.losses,
        "epochs": [asdict(r) for r in result.epochs],
        "work_dir": str(work_dir),
    }
    print_report(report, request.as_json)
    return 0


def fetch_pairs(
    request: FinetuneRequest, settings: Any, size_px: int, total: int, console: Console
) -> Any:
    """The pairs, with a bar over the images being fetched and decoded."""
    from capworks.finetune.data import load_pairs
    from capworks.schema.storage import LazyS3Client

    columns = (TextColumn("fetching"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not request.show_progress) as progress:
        task = progress.add_task("fetch", total=total)
        return load_pairs(
            request.references,
            request.images_root,
            settings,
            size_px,
            LazyS3Client(settings),
            on_image=lambda: progress.advance(task),
        )


class EpochLog:
    """Prints each epoch's held-out figures above the bar."""

    def __init__(self, console: Console, progress: Progress) -> None:
        self._console = console
        self._progress = progress

    def log_epoch(self, report: EpochReport) -> None:
        """One line per evaluation."""
        figures = ", ".join(f"{k} {v:.3f}" for k, v in report.metrics.items())
        self._progress.console.print(
            f"epoch {report.epoch} (step {report.step}): held-out loss {report.loss:.4f}"
            + (f", {figures}" if figures else "")
        )


class training_progress:  # noqa: N801 - used as a context manager, like contextlib's helpers
    """A bar over training steps with the loss, step rate and ETA."""

    def __init__(self, console: Console, show: bool) -> None:
        self._progress = Progress(
            TextColumn("fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not show,
        )
        self._task: Any = None
        self._log = EpochLog(console, self._progress)

    def __enter__(self) -> tuple[Any, EpochLog]:
        self._progress.__enter__()

        def on_step(step: int, total: int, loss: float) -> None:
            if self._task is None:
                self._task = self._progress.add_task("train", total=total, loss=loss, rate="")
                self._progress.update(self._task, completed=step - 1)
            self._progress.update(self._task, completed=step, loss=loss)
            speed = self._progress.tasks[self._task].speed
            rate = f"{speed:.2f} steps/s" if speed else ""
            self._progress.update(self._task, rate=rate)

        return on_step, self._log

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)


def skipped_text(skipped: dict[str, int]) -> str:
    """`not_found 2, undecodable 1`, or `none skipped`."""
    return ", ".join(f"{code} {n}" for code, n in sorted(skipped.items())) or "none skipped"


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """A few lines, or one JSON object."""
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console = Console()
    resumed = f" (resumed at step {report['resumed_from']})" if report["resumed_from"] else ""
    console.print(
        plain(f"fine-tuned {report['base']['model_id']} for {report['steps']} steps{resumed}")
    )
    console.print(
        plain(
            f"{report['train_pairs']} training pairs, {report['held_out_pairs']} held out; "
            f"{report['images']} images, skipped: {skipped_text(report['skipped'])}"
        )
    )
    for epoch in report["epochs"]:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in epoch["metrics"].items())
        console.print(
            plain(f"epoch {epoch['epoch']}: held-out loss {epoch['loss']:.4f} {figures}".rstrip())
        )
    console.print(plain(f"model folder: {report['output']} (revision {report['revision']})"))
