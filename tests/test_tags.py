"""Tags are lemmatised content words scored by how many hypotheses contain them."""

from __future__ import annotations

from workers.tags import content_lemmas, derive_tags


def test_content_words_are_lemmatised_and_function_words_dropped() -> None:
    assert content_lemmas("two dogs are running on the beaches") == ["two", "dog", "run", "beach"]


def test_tag_scores_count_agreeing_alternatives() -> None:
    tags = dict(
        derive_tags(
            "a dog running on a beach",
            ["a dog on the beach", "dogs playing in the sand", "a cat on a beach"],
        )
    )
    assert tags["dog"] == 0.75  # caption + 2 of 3 alternatives
    assert tags["beach"] == 0.75
    assert tags["run"] == 0.25
    assert tags["cat"] == 0.25
    assert "a" not in tags and "on" not in tags


def test_participles_take_the_verb_lemma_and_plurals_the_noun_lemma() -> None:
    assert content_lemmas("men sitting and children playing with kites") == [
        "man",
        "sit",
        "child",
        "play",
        "kite",
    ]


def test_tags_come_best_first() -> None:
    scores = [s for _, s in derive_tags("a red square", ["a red circle", "a blue square"])]
    assert scores == sorted(scores, reverse=True)
