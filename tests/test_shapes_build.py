"""The shapes build says what it does while it trains, and a cached build of an older recipe
is rebuilt rather than trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capworks.checkpoints.build import TrainingProgress
from capworks.checkpoints.layout import BUILD_VERSIONS, is_current_build


def write_record(folder: Path, record: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps(record))
    return folder


def test_a_cached_build_of_another_recipe_version_is_not_current(tmp_path: Path) -> None:
    today = BUILD_VERSIONS["shapes"]
    for version in (today - 1, today + 1):
        record = {"name": "shapes", "build_version": version}
        assert not is_current_build(write_record(tmp_path / str(version), record), "shapes")


def test_a_cached_build_of_todays_version_is_current(tmp_path: Path) -> None:
    record = {"name": "shapes", "build_version": BUILD_VERSIONS["shapes"]}
    assert is_current_build(write_record(tmp_path / "new" / "shapes", record), "shapes")
    # A record from before versions counts as version 1, as every random checkpoint still is.
    assert is_current_build(write_record(tmp_path / "tiny-random", {}), "tiny-random")


def test_a_missing_or_unreadable_build_record_is_not_current(tmp_path: Path) -> None:
    assert not is_current_build(tmp_path / "absent", "shapes")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "build.json").write_text("{half")
    assert not is_current_build(broken, "tiny-random")


def test_training_progress_prints_plain_lines_with_rate_and_time_left_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with TrainingProgress(total_steps=100, line_every=25) as progress:
        for step in range(50):
            progress.step(step, loss=1.0 / (step + 1), exact=0.5)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "training shapes: step 25/100",
        "training shapes: step 50/100",
    ]
    assert all("steps/s" in line and "min left" in line for line in lines)
    assert "held-out exact 50%" in lines[-1]
