"""Fine-tuning `shapes` on a shifted world it has never seen: CIDEr-D before and after, and what
it forgot, in one run. Runs in the train venv:

    .venv-train/bin/python bench/finetune.py [--steps N] [--batch-size N] [--lr X]
        [--warmup-steps N] [--lr-schedule linear|cosine|const] [--label-smoothing X]
        [--shifted N] [--replay N] [--held-out N]

The shifted world (capworks/checkpoints/shifted_world.py) is made of words `shapes` never saw:
squares and backgrounds in four new colours ("a purple square on a grey background"). The
fine-tune data is `--shifted` shifted images plus `--replay` images of the original world (so
the old colours are rehearsed), written as a JSONL references file and trained on with
`capworks finetune`'s own code path (ModelScope's OFA trainer). The base is whatever `shapes`
checkpoint is current (built here first if missing), read from its own configuration. Both
held-out sets (shifted, original; seeds unlike the training ones) are captioned by the base and
by the fine-tuned model with the engine's default generator and scored with `capworks eval`'s
CIDEr-D. Prints the table, the training time and steps/s. On a loaded machine set
OMP_NUM_THREADS=1: two OpenMP threads contending with other jobs ran ~20 s a step here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.checkpoints.shifted_world import sample_shifted, write_references
from capworks.commands.finetune import FinetuneRequest, run_finetune
from capworks.evaluation import choose_tokenizer, score_captions
from capworks.finetune.trainer import TrainOptions
from capworks.references import load_references
from capworks.schema.checkpoint import resolve_checkpoint
from capworks.schema.settings import get_settings
from capworks.workers.engine import OfaEngine

TRAIN_SEEDS = (101, 102)
HELD_OUT_SEEDS = (201, 202)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--lr-schedule", default="linear", choices=["linear", "cosine", "const"])
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--shifted", type=int, default=192, help="shifted training images")
    p.add_argument("--replay", type=int, default=64, help="original-world training images")
    p.add_argument("--held-out", type=int, default=60, help="images per held-out set")
    p.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"])
    return p.parse_args(argv)


def cider_d(model: str, refs_file: Path, tokenizer: str) -> float:
    """CIDEr-D of `model`'s captions of the images a references file names."""
    refs = load_references(refs_file)
    config = resolve_checkpoint(model, None, get_settings().checkpoint_dir)
    engine = OfaEngine.load(config, device="cpu", batch_size=20)
    try:
        uris = list(refs)
        blobs = [Path(uri.removeprefix("file://")).read_bytes() for uri in uris]
        results = engine.caption_images(blobs)
    finally:
        engine.close()
    hyps = {
        uri: r.caption.text
        for uri, r in zip(uris, results, strict=True)
        if not isinstance(r, Exception)
    }
    return score_captions(refs, hyps, tokenizer, False).metrics["CIDEr-D"]


def main(argv: Sequence[str] | None = None) -> None:
    """Build the sets, measure before, fine-tune, measure after, print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tokenizer = choose_tokenizer(args.tokenizer)
    load_before = f"{os.getloadavg()[0]:.1f}"
    shapes = ensure_checkpoint("shapes", get_settings().checkpoint_dir)
    patch_px = json.loads((shapes / "configuration.json").read_text())["model"].get(
        "patch_image_size"
    )
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        train = sample_shifted(args.shifted, TRAIN_SEEDS[0]) + sample_scenes(
            args.replay, TRAIN_SEEDS[1]
        )
        random.Random(0).shuffle(train)
        train_refs = write_references(root / "train", train, "train")
        shifted = write_references(
            root / "shifted", sample_shifted(args.held_out, HELD_OUT_SEEDS[0]), "shifted"
        )
        original = write_references(
            root / "original", sample_scenes(args.held_out, HELD_OUT_SEEDS[1]), "original"
        )
        before = {
            name: cider_d(str(shapes), f, tokenizer)
            for name, f in (("shifted", shifted), ("original", original))
        }
        out = root / "tuned"
        options = TrainOptions(
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            lr_schedule=args.lr_schedule,
            label_smoothing=args.label_smoothing,
            batch_size=args.batch_size,
            save_every=max(args.steps, 1),
        )
        started = time.monotonic()
        run_finetune(
            FinetuneRequest(
                train_refs, out, str(shapes), None, options, held_out=0.0, tokenizer=tokenizer,
                show_progress=True,
            )
        )  # fmt: skip
        train_s = time.monotonic() - started
        record = json.loads((out / "configuration.json").read_text())["capworks_finetune"]
        steps = int(record["steps"])  # --steps rounded up to whole epochs of that length
        after = {
            name: cider_d(str(out), f, tokenizer)
            for name, f in (("shifted", shifted), ("original", original))
        }
    print()
    built = json.loads((shapes / "build.json").read_text())
    print(f"base: {shapes} (patch {patch_px} px, built {built.get('steps')} steps, "
          f"{built.get('train_seconds')} s); load average {load_before} before, "
          f"{os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"fine-tune: {steps} steps of {args.batch_size} pairs, lr {args.lr} "
          f"({args.lr_schedule}, {args.warmup_steps} warm-up), {args.shifted} shifted + "
          f"{args.replay} original images; {train_s:.0f} s in all "
          f"(fetch, load, train, save), {steps / train_s:.2f} steps/s")  # fmt: skip
    print(f"{'held-out set':<14} {'CIDEr-D before':>15} {'after':>8} {'after/before':>13}")
    for name in ("shifted", "original"):
        ratio = f"{after[name] / before[name]:.2f}x" if before[name] else "inf (before 0)"
        print(f"{name:<14} {before[name]:>15.3f} {after[name]:>8.3f} {ratio:>13}")
    learned = after["shifted"] >= 3 * before["shifted"] and after["shifted"] > 0
    kept = after["original"] >= 0.9 * before["original"]
    print(f"goals: shifted >= 3x before: {'met' if learned else 'NOT met'}; "
          f"original down <= 10%: {'met' if kept else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
