"""The engine in the main venv (torch 2.13.0 CPU) against the train venv (torch 2.14.1 +
torchvision 0.29.1): CPU speed and tokens, in one run (issue 24's one-venv question).

    .venv/bin/python bench/venv_compare.py [--rounds 2] [--images 8] [--batch-sizes 1,4]

Each round runs `bench/engine.py --compare` (reference and fast generators, `tiny-random`) in
each venv, alternating A, B, A, B so that a load change on a shared machine hits both, and
then captions the same synthetic images with the fast generator in each venv and compares
every token. Prints images/s per venv, generator and batch (best round), the ratio of the
train venv to the main one, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENVS = {"main (torch 2.13.0)": REPO / ".venv", "train (torch 2.14.1)": REPO / ".venv-train"}
LINE = re.compile(r"^\s+(\w+) float32 batch (\d+): ([\d.]+) images/s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--tokens-of", help=argparse.SUPPRESS)  # child mode: print tokens as JSON
    return p.parse_args(argv)


def print_tokens(model: str, images: int) -> None:
    """Child mode: the fast generator's tokens for the synthetic images, as one JSON line."""
    import torch
    from engine import config_for, synthetic_images  # bench/engine.py, beside this script

    from capworks.workers.engine import OfaEngine

    engine = OfaEngine.load(config_for(model, None), device="cpu", batch_size=4)
    try:
        results = engine.caption_images(synthetic_images(images, 0))
    finally:
        engine.close()
    tokens = [list(r.caption.tokens) for r in results if not isinstance(r, Exception)]
    print(json.dumps({"torch": torch.__version__, "tokens": tokens}))


def run_in(venv: Path, args: list[str]) -> str:
    """A command in a venv's python, from the repository root; its stdout."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{venv.name}: {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main(argv: Sequence[str] | None = None) -> None:
    """Alternate the venvs, then print the table and the token check."""
    args = parse_args(argv)
    if args.tokens_of:
        print_tokens(args.tokens_of, args.images)
        return
    best: dict[tuple[str, str, int], float] = defaultdict(float)
    engine_args = ["bench/engine.py", "--compare", "--model", "tiny-random", "--device", "cpu",
                   "--images", str(args.images), "--batch-sizes", args.batch_sizes]  # fmt: skip
    for round_no in range(args.rounds):
        for name, venv in VENVS.items():
            out = run_in(venv, engine_args)
            for line in out.splitlines():
                if match := LINE.match(line):
                    key = (name, match.group(1), int(match.group(2)))
                    best[key] = max(best[key], float(match.group(3)))
            print(f"round {round_no + 1} {name}: done", file=sys.stderr)
    tokens = {
        name: json.loads(run_in(venv, ["bench/venv_compare.py", "--tokens-of", "tiny-random",
                                       "--images", str(args.images)]).splitlines()[-1])
        for name, venv in VENVS.items()
    }  # fmt: skip
    main_name, train_name = list(VENVS)
    print(f"{'generator':<10} {'batch':>5} {main_name:>20} {train_name:>20} {'train/main':>11}")
    for generator in ("reference", "fast"):
        for batch in sorted({k[2] for k in best}):
            a, b = best[(main_name, generator, batch)], best[(train_name, generator, batch)]
            ratio = b / a if a else float("nan")
            print(f"{generator:<10} {batch:>5} {a:>20.2f} {b:>20.2f} {ratio:>10.3f}x")
    same = tokens[main_name]["tokens"] == tokens[train_name]["tokens"]
    count = len(tokens[main_name]["tokens"])
    print(f"fast generator tokens, {count} images: {'identical' if same else 'DIFFERENT'} "
          f"({tokens[main_name]['torch']} vs {tokens[train_name]['torch']})")  # fmt: skip


if __name__ == "__main__":
    main()
