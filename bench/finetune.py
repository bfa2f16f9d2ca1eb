"""Fine-tuning `shapes` on a shifted world it has never seen: CIDEr-D before and after, and what
it forgot, in one run. Runs in the train venv:

    .venv-train/bin/python bench/finetune.py [--steps 120] [--batch-size 16] [--lr 5e-4]
                                             [--shifted 192] [--replay 64] [--held-out 60]

The shifted world (capworks/checkpoints/shifted_world.py) has square colours of its own
("a purple square on a white background"). The fine-tune data is `--shifted` shifted images
plus `--replay` images of the original world (so the old colours are rehearsed), written as a
JSONL references file and trained on with `capworks finetune`'s own code path (ModelScope's OFA
trainer). Both held-out sets (shifted, original; seeds unlike the training ones) are captioned
by the base and by the fine-tuned model with the engine's default generator and scored with
`capworks eval`'s CIDEr-D. Prints the table, the training time and steps/s.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    shapes = ensure_checkpoint("shapes", get_settings().checkpoint_dir)
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
    print(f"fine-tune: {steps} steps of {args.batch_size} pairs, lr {args.lr}, "
          f"{args.shifted} shifted + {args.replay} original images; {train_s:.0f} s in all "
          f"(fetch, load, train, save), {steps / train_s:.2f} steps/s")  # fmt: skip
    print(f"{'held-out set':<14} {'CIDEr-D before':>15} {'after':>8} {'after/before':>13}")
    for name in ("shifted", "original"):
        ratio = after[name] / before[name] if before[name] else float("inf")
        print(f"{name:<14} {before[name]:>15.3f} {after[name]:>8.3f} {ratio:>12.2f}x")


if __name__ == "__main__":
    main()
