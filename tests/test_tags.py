"""Tags are lemmatised content words scored by the probability of the hypotheses holding them."""

from __future__ import annotations

import math

import pytest

from capworks.schema.tags import content_lemmas, derive_tags, hypothesis_weights


def test_content_words_are_lemmatised_and_function_words_dropped() -> None:
    assert content_lemmas("two dogs are running on the beaches") == ["two", "dog", "run", "beach"]


def test_hypotheses_weigh_the_softmax_of_their_beam_scores() -> None:
    weights = hypothesis_weights([-0.5, -1.0, -1.5])
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(math.exp(0.5))
    assert hypothesis_weights([-2.0, -2.0]) == [0.5, 0.5]
    assert hypothesis_weights([-1e4, -1e4 - 1]) == pytest.approx([0.7311, 0.2689], abs=1e-4)


def test_the_captions_own_colour_leads_the_colours_it_rejected() -> None:
    # Five hypotheses that agree on "square" and each name another colour: counted, every colour
    # scored 0.2; weighted, the caption's colour leads and each rejected one is below it.
    tags = dict(
        derive_tags(
            [
                ("a red square", -0.3),
                ("a blue square", -0.8),
                ("a green square", -0.9),
                ("a yellow square", -1.0),
                ("a white square", -1.1),
            ]
        )
    )
    assert tags["square"] == 1.0
    assert tags["red"] > 1.5 * tags["blue"] and tags["blue"] > tags["green"] > tags["white"]
    assert tags["red"] == pytest.approx(1 / (1 + sum(math.exp(-d) for d in (0.5, 0.6, 0.7, 0.8))))


def test_tag_scores_add_up_the_weights_of_agreeing_hypotheses() -> None:
    # Equal beam scores weigh equally: the share of hypotheses.
    tags = dict(
        derive_tags(
            [
                ("a dog running on a beach", -1.0),
                ("a dog on the beach", -1.0),
                ("dogs playing in the sand", -1.0),
                ("a cat on a beach", -1.0),
            ]
        )
    )
    assert tags["dog"] == 0.75  # caption + 2 of 3 alternatives
    assert tags["beach"] == 0.75
    assert tags["run"] == 0.25
    assert tags["cat"] == 0.25
    assert "a" not in tags and "on" not in tags
    assert derive_tags([]) == []


def test_participles_take_the_verb_lemma_and_plurals_the_noun_lemma() -> None:
    assert content_lemmas("men sitting and children playing with kites") == [
        "man",
        "sit",
        "child",
        "play",
        "kite",
    ]


def test_tags_come_best_first() -> None:
    hypotheses = [("a red square", -0.2), ("a red circle", -0.7), ("a blue square", -0.9)]
    scores = [s for _, s in derive_tags(hypotheses)]
    assert scores == sorted(scores, reverse=True)
