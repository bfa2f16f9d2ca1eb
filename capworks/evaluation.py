"""COCO caption metrics of hypotheses against references: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D,
computed by `pycocoevalcap`'s own scorers after its PTB tokenizer, as the COCO caption server does.

The PTB tokenizer and METEOR are Java programs shipped inside pycocoevalcap. Without a `java` on
PATH the captions are tokenized by `tokenize_simple` (the same words for ordinary captions; a
test compares the two) and METEOR is left out. SPICE is never computed: it downloads Stanford
CoreNLP models at run time, which an offline machine cannot do.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
TokenizerName = Literal["auto", "ptb", "simple"]

# What pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--"]
    + ["...", ";"]
)
# Clitics the PTB tokenizer splits off a word ("dog's" -> "dog 's", "can't" -> "ca n't").
_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ve|'ll|'d|'m)$")
# A word keeps inner hyphens, dots, commas between digits, apostrophes and ampersands, as PTB does.
_TOKEN = re.compile(r"(?:[a-z]\.){2,}|[a-z0-9]+(?:(?:[-.&/']|,(?=\d))[a-z0-9]+)*'?|[^\sa-z0-9]")
# Brackets are kept as PTB's names, lower-cased (pycocoevalcap drops only the upper-case ones).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


class EvaluationError(ValueError):
    """Nothing to score, or references and hypotheses that do not fit together."""


@dataclass(frozen=True)
class Scores:
    """Corpus scores by metric name (METRICS order; METEOR absent without Java), the CIDEr-D of
    each image, and how the captions were tokenized (`ptb` or `simple`)."""

    metrics: dict[str, float]
    cider_per_image: dict[str, float]
    tokenizer: str

    @property
    def images(self) -> int:
        """How many images were scored."""
        return len(self.cider_per_image)


def java_available() -> bool:
    """True when a `java` runtime is on PATH (the PTB tokenizer and METEOR need one)."""
    return shutil.which("java") is not None


def tokenize_simple(text: str) -> str:
    """Lower-case, split off punctuation and clitics, drop punctuation: PTB's words for captions."""
    words: list[str] = []
    for token in _TOKEN.findall(text.lower().replace("\u2019", "'")):
        match = _CLITIC.search(token)
        if match and match.start() > 0:
            stem = token[: match.start()]
            words.extend([stem, match.group(1)])
            continue
        words.append(_BRACKETS.get(token, token.rstrip("'") or token))
    return " ".join(w for w in words if w and w not in PTB_PUNCTUATION and not _is_symbol(w))


def _is_symbol(word: str) -> bool:
    # Quotes become `` and '' in PTB and are then dropped with the punctuation.
    return len(word) == 1 and word in "\"'`"


def tokenize(sentences: Sequence[str], tokenizer: str) -> list[str]:
    """Each caption tokenized: by Stanford's PTB tokenizer (Java, one run) or `tokenize_simple`."""
    if tokenizer == "simple":
        return [tokenize_simple(c) for c in sentences]
    # Stanford's tokenizer reads one caption per line: a newline inside one would shift the rest.
    return _ptb_lines([" ".join(c.split()) for c in sentences])


def _ptb_lines(sentences: list[str]) -> list[str]:
    # pycocoevalcap's PTBTokenizer runs this jar on a temporary file it writes next to itself
    # (so not from a read-only site-packages) and lets Java's chatter through to stderr; we run
    # the same command on stdin, keep stderr, check the exit status, then drop its punctuation.
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
    done = subprocess.run(  # noqa: S603 - java and the jar pycocoevalcap ships, no shell
        [*cmd, "-preserveLines", "-lowerCase"],
        input="\n".join(sentences).encode(),
        capture_output=True,
        check=False,
    )
    lines = done.stdout.decode().split("\n")
    if done.returncode != 0 or len(lines) < len(sentences):
        reason = done.stderr.decode().strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise EvaluationError(f"the PTB tokenizer failed: {reason[0][:200]}")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    kept = lines[: len(sentences)]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in kept]


def choose_tokenizer(tokenizer: TokenizerName) -> Literal["ptb", "simple"]:
    """`auto` is `ptb` when Java is there, else `simple`; asking for `ptb` without Java fails."""
    if tokenizer == "auto":
        return "ptb" if java_available() else "simple"
    if tokenizer == "ptb" and not java_available():
        raise EvaluationError("the PTB tokenizer needs java on PATH (or use --tokenizer simple)")
    return tokenizer


def score_captions(
    references: Mapping[str, Sequence[str]],
    hypotheses: Mapping[str, str],
    tokenizer: TokenizerName = "auto",
    meteor: bool | None = None,
) -> Scores:
    """Score one hypothesis per image against that image's references, over the images that have
    both. `meteor=None` computes METEOR when Java is available."""
    keys = [k for k in references if k in hypotheses]
    if not keys:
        raise EvaluationError("no image has both references and a hypothesis")
    empty = [k for k in keys if not references[k]]
    if empty:
        raise EvaluationError(f"image {empty[0]!r} has no reference caption")
    with_meteor = java_available() if meteor is None else meteor
    if with_meteor and not java_available():
        raise EvaluationError("METEOR needs java on PATH")
    used = choose_tokenizer(tokenizer)
    flat = [c for k in keys for c in references[k]] + [hypotheses[k] for k in keys]
    words = iter(tokenize(flat, used))
    gts = {k: [next(words) for _ in references[k]] for k in keys}
    res = {k: [next(words)] for k in keys}
    metrics, per_image = _run_scorers(gts, res, with_meteor)
    return Scores(metrics, dict(zip(keys, per_image, strict=True)), used)


def _run_scorers(
    gts: dict[str, list[str]], res: dict[str, list[str]], with_meteor: bool
) -> tuple[dict[str, float], list[float]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            metrics[f"BLEU-{n}"] = float(value)
        if with_meteor:
            metrics["METEOR"] = _meteor(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        metrics["ROUGE-L"] = float(rouge)
        # pycocoevalcap's "CIDEr" is CIDEr-D: clipped counts, a Gaussian length penalty, x10.
        cider, per_image = Cider().compute_score(gts, res)
        metrics["CIDEr-D"] = float(cider)
    return metrics, [float(v) for v in per_image]


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer: Any = Meteor()
    try:
        value, _ = scorer.compute_score(gts, res)
    finally:
        # Stop the Java process now rather than whenever the object is collected.
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(value)
