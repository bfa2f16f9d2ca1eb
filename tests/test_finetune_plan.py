"""The fine-tune's plan, without training: the shifted world's words and the trainer's
configuration (ModelScope's `train` section) that `capworks finetune` writes. No server, no
trainer: these run in the main venv too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from capworks.checkpoints.shapes_world import all_scenes
from capworks.checkpoints.shifted_world import sample_shifted, shifted_scenes
from capworks.finetune.trainer import TrainOptions, training_configuration

TEMPLATE = {"a", "square", "on", "background"}


def words(captions: list[str]) -> set[str]:
    """The words of some captions."""
    return {w for c in captions for w in re.findall(r"[a-z]+", c)}


def test_the_shifted_world_names_its_scenes_only_with_words_the_base_never_saw() -> None:
    original = words([s.caption for s in all_scenes()])
    shifted = words([s.caption for s in shifted_scenes()])
    # Only the template is shared: every word telling one shifted caption from another is new,
    # so the base model cannot earn CIDEr-D there before it is fine-tuned.
    assert shifted & original == TEMPLATE
    assert len(shifted - TEMPLATE) >= 4


def test_every_shifted_scene_colours_square_and_background_differently() -> None:
    scenes = shifted_scenes()
    assert len({s.caption for s in scenes}) == len(scenes) >= 12
    assert all(s.colour != s.background for s in scenes)
    drawn = sample_shifted(40, seed=3)
    assert [c for _, c in drawn] == [c for _, c in sample_shifted(40, seed=3)]
    assert {c for _, c in drawn} <= {s.caption for s in scenes}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "const"])
def test_the_learning_rate_schedule_reaches_modelscopes_trainer(
    tmp_path: Path, schedule: str
) -> None:
    options = TrainOptions(max_steps=40, lr=1e-3, warmup_steps=10, batch_size=8,
                           lr_schedule=schedule)  # type: ignore[arg-type]  # fmt: skip
    cfg = training_configuration({"model": {}}, options, tmp_path, 160, 1)
    train = cfg["train"]
    assert train["lr_scheduler"] == {"name": schedule, "warmup_proportion": 0.25}
    assert train["max_epochs"] * train["train_iters_per_epoch"] == 40
    assert train["optimizer"]["lr"] == 1e-3
