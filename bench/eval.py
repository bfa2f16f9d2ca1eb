"""`capworks eval`'s scoring on a COCO-test-sized set: 5,000 images with 5 references each.

    .venv/bin/python bench/eval.py [--images 5000] [--refs 5] [--seed 1]

Captions are drawn from a small English caption grammar (about 600 distinct words), the
hypothesis of each image sharing some words with its references, as a real model's do. Timed in
one run: the PTB tokenizer (Java) and the pure-Python one on every caption, then the whole
scoring without METEOR and with it (the Java METEOR, paraphrase tables loaded each run).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from capworks.evaluation import score_captions, tokenize

SUBJECTS = "man woman child dog cat bird horse cow sheep elephant giraffe zebra bear".split()
ADJECTIVES = "young old small large brown black white red blue green yellow grey happy".split()
VERBS = "sitting standing walking running riding holding eating playing lying looking".split()
PLACES = (
    "street beach field kitchen table bench road park room snow grass water sand city "
    "counter couch bed window train bus boat plate"
).split()
WORDS = [f"{a}{b}" for a in ("pa", "ro", "ki", "me", "su") for b in ("ne", "lo", "ta", "ri")]


def sentence(rng: random.Random, subject: str, place: str) -> str:
    """One caption about `subject` at `place`, with random wording around them."""
    adj = rng.choice(ADJECTIVES)
    extra = " ".join(rng.choice(WORDS) + rng.choice("xyzw") for _ in range(rng.randint(0, 3)))
    det = rng.choice(["a", "the", "one"])
    tail = rng.choice(["", " next to a tree", " in the sun", " near some people", "."])
    return f"{det} {adj} {subject} {rng.choice(VERBS)} on a {place} {extra}{tail}".strip()


def make_set(images: int, refs: int, seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """References and one hypothesis per image."""
    rng = random.Random(seed)
    references, hypotheses = {}, {}
    for i in range(images):
        subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
        references[f"img{i}"] = [sentence(rng, subject, place) for _ in range(refs)]
        guess = subject if rng.random() < 0.7 else rng.choice(SUBJECTS)
        hypotheses[f"img{i}"] = sentence(rng, guess, place)
    return references, hypotheses


def timed(label: str, fn: Callable[[], object]) -> float:
    """Run `fn()` once and print its wall time."""
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    print(f"{label:<42} {elapsed:8.2f} s")
    return elapsed


def main() -> None:
    """Time tokenizing and scoring one generated set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    references, hypotheses = make_set(args.images, args.refs, args.seed)
    flat = [c for caps in references.values() for c in caps] + list(hypotheses.values())
    print(f"{args.images} images, {args.refs} references each, {len(flat)} captions")
    ptb = timed("PTB tokenizer (Java), every caption", lambda: tokenize(flat, "ptb"))
    simple = timed("simple tokenizer (Python), every caption", lambda: tokenize(flat, "simple"))
    same = sum(a == b for a, b in zip(tokenize(flat, "ptb"), tokenize(flat, "simple"), strict=True))
    print(f"tokenizers agree on {same}/{len(flat)} captions; PTB/simple time {ptb / simple:.0f}x")
    got: dict[str, dict[str, float]] = {}

    def run(meteor: bool) -> None:
        got[str(meteor)] = score_captions(references, hypotheses, "ptb", meteor=meteor).metrics

    without = timed("score: BLEU, ROUGE-L, CIDEr-D (PTB)", lambda: run(False))
    with_m = timed("score: the same and METEOR", lambda: run(True))
    print(f"METEOR adds {with_m - without:.2f} s ({with_m / without:.1f}x the scoring without it)")
    print("  ".join(f"{k} {v:.4f}" for k, v in got["True"].items()))


if __name__ == "__main__":
    main()
