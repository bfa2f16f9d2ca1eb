"""Tags: the content words of a caption and its alternatives, lemmatised, scored by the
probability of the hypotheses that hold them.

Lemmas come from lemminflect's dictionary. Captions use "-ing" forms as participles ("a man
riding a horse"), so those take the verb lemma; other words take the noun lemma when there is
one. Each returned hypothesis (best caption and alternatives) weighs its probability among them,
the softmax of the beam scores; a tag's score is the weight of the hypotheses whose lemmas
contain it. A word every beam agrees on scores 1.0, and the caption's own words lead the words
of any one rejected hypothesis (a plain count of hypotheses gave the caption's colour and four
rejected colours the same 0.2). The stored tags were recomputed so by migration 0007; they are
in `schema/` because that migration needs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from lemminflect import getAllLemmas, getAllLemmasOOV

# Closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliaries): they say
# nothing about what is in the image. Numbers and position words ("top", "front") stay.
FUNCTION_WORDS = frozenset(
    """
a an the this that these those some any each every no another other such
i me my we our you your he him his she her it its they them their there here
what which who whom whose where when while how why
of in on at to from by with without for about into onto over under above below
between among through across along around near behind beside besides inside outside
off up down out upon against toward towards within during before after than as
and or but nor so yet if then else because although though
be is are was were been being am do does did have has had having
can could will would shall should may might must
not very too also just only still even
""".split()
)
_WORD = re.compile(r"[a-z]+")
_POS_ORDER = ("NOUN", "VERB", "ADJ", "ADV", "PROPN")


@lru_cache(maxsize=65536)
def lemma_of(word: str) -> str:
    """The dictionary lemma of one lower-case word (cached: caption vocabularies are small)."""
    lemmas = getAllLemmas(word)
    if word.endswith("ing") and "VERB" in lemmas:
        return str(lemmas["VERB"][0])
    for pos in _POS_ORDER:
        if pos in lemmas:
            return str(lemmas[pos][0])
    oov = getAllLemmasOOV(word, upos="NOUN")
    return str(oov["NOUN"][0]) if oov.get("NOUN") else word


@lru_cache(maxsize=65536)
def content_lemma(word: str) -> str | None:
    """The lemma of a lower-case word, or None for a function word (cached)."""
    if len(word) < 2 or word in FUNCTION_WORDS:
        return None
    lemma = lemma_of(word)
    return None if lemma in FUNCTION_WORDS else lemma


def content_lemmas(text: str) -> list[str]:
    """The lemmas of the content words of `text`, in order, without repeats."""
    found = dict.fromkeys(content_lemma(word) for word in _WORD.findall(text.lower()))
    return [lemma for lemma in found if lemma is not None]


def hypothesis_weights(scores: Sequence[float]) -> list[float]:
    """The softmax of beam scores (log-probabilities): each hypothesis's share of the
    probability of those returned, summing to 1."""
    top = max(scores)
    exps = [math.exp(score - top) for score in scores]  # shifted: no overflow
    total = sum(exps)
    return [e / total for e in exps]


def derive_tags(hypotheses: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Tags of (text, beam score) hypotheses, the caption first, with scores in [0, 1], best
    first; ties keep first-seen order. A tag scores the summed weight of the hypotheses holding
    it."""
    if not hypotheses:
        return []
    weights = hypothesis_weights([score for _, score in hypotheses])
    scores: dict[str, float] = {}  # keeps first-seen order
    for (text, _), weight in zip(hypotheses, weights, strict=True):
        for lemma in content_lemmas(text):
            scores[lemma] = scores.get(lemma, 0.0) + weight
    # Rounded: sums of floats would tell 1.0 from 0.9999999999999999 apart.
    scored = [(tag, round(min(score, 1.0), 6)) for tag, score in scores.items()]
    return sorted(scored, key=lambda item: -item[1])
