"""Tags: the content words of a caption and its alternatives, lemmatised, scored by agreement.

A tag's score is the share of the returned hypotheses (best caption and alternatives) whose
lemmas contain it, so a word every beam agrees on scores 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import simplemma
from stop_words import get_stop_words


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    return frozenset(get_stop_words("en"))


def content_lemmas(text: str) -> list[str]:
    """The lemmas of the content words of `text`, in order, without repeats."""
    stop = _stop_words()
    out: list[str] = []
    for token in simplemma.simple_tokenizer(text.lower()):
        if not token.isalpha() or len(token) < 2 or token in stop:
            continue
        lemma = simplemma.lemmatize(token, lang="en")
        if lemma not in stop and lemma not in out:
            out.append(lemma)
    return out


def derive_tags(caption: str, alternatives: Sequence[str]) -> list[tuple[str, float]]:
    """Tags with scores in [0, 1], best first; ties keep the caption's word order."""
    hypotheses = [caption, *alternatives]
    lemma_sets = [set(content_lemmas(h)) for h in hypotheses]
    candidates: list[str] = []
    for h in hypotheses:
        candidates.extend(lemma for lemma in content_lemmas(h) if lemma not in candidates)
    scored = [(tag, sum(tag in s for s in lemma_sets) / len(hypotheses)) for tag in candidates]
    return sorted(scored, key=lambda item: -item[1])
