"""`capworks finetune`: ModelScope's OFA trainer on the shifted `shapes` world, for a few steps.

The training tests need the train venv (torchvision for torch 2.14.1): in the main venv they
skip with that reason; scripts/test.sh builds `.venv-train` and runs them there (`-m train`).
The bad-input tests run in both venvs: references are checked before anything loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli

try:
    import torchvision  # noqa: F401 - only whether the trainer can load here

    TRAIN_VENV = True
except (ImportError, OSError, RuntimeError):
    TRAIN_VENV = False

needs_train_venv = pytest.mark.skipif(
    not TRAIN_VENV,
    reason="needs the train venv: no torchvision loads beside this torch "
    "(bash scripts/install.sh --train; scripts/test.sh runs these in .venv-train)",
)
QUICK = ["--batch-size", "4", "--lr", "1e-3", "--tokenizer", "simple", "--no-progress", "--json"]


def shifted_references(folder: Path, count: int, seed: int) -> Path:
    """`count` shifted-world images and their captions, plus a missing and a broken image."""
    from capworks.checkpoints.shifted_world import sample_shifted, write_references

    refs = write_references(folder, sample_shifted(count, seed), "shifted")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with refs.open("a") as f:
        f.write(json.dumps({"uri": "missing.png", "caption": "a purple square"}) + "\n")
        f.write(json.dumps({"uri": "broken.png", "caption": "a pink square"}) + "\n")
    return refs


@pytest.fixture(scope="module")
def finetuned(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short fine-tune of `shapes` on the shifted world (6 steps of 4 pairs)."""
    folder = tmp_path_factory.mktemp("finetune")
    refs = shifted_references(folder / "data", 30, seed=11)
    out = folder / "model"
    done = run_cli(
        "finetune", str(refs), "--model", "shapes", "--output", str(out),
        "--max-steps", "6", "--held-out", "0.2", "--save-every", "3", *QUICK,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"report": json.loads(done.stdout), "out": out, "refs": refs, "base": shapes_dir}


@pytest.mark.train
@pytest.mark.slow
@needs_train_venv
def test_a_short_run_on_shifted_data_lowers_the_held_out_loss(finetuned: dict[str, Any]) -> None:
    epochs = finetuned["report"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]  # the base model's figures, then the epoch's
    assert epochs[1]["loss"] < epochs[0]["loss"]
    assert "CIDEr-D" in epochs[1]["metrics"]
    assert finetuned["report"]["steps"] == 6


@pytest.mark.train
@pytest.mark.slow
@needs_train_venv
def test_the_output_is_a_loadable_model_folder_with_a_new_identity(
    finetuned: dict[str, Any],
) -> None:
    from capworks.schema.checkpoint import resolve_checkpoint, resolve_identity
    from capworks.schema.settings import get_settings
    from capworks.workers.engine import OfaEngine

    out, cache = finetuned["out"], get_settings().checkpoint_dir
    config = resolve_checkpoint(str(out), None, cache)
    base = resolve_checkpoint("shapes", None, cache)
    base_folder = resolve_checkpoint(str(finetuned["base"]), None, cache)
    assert config.model_id.startswith("local:")
    assert config.model_id not in (base.model_id, base_folder.model_id)
    assert resolve_identity(str(out), None, cache) == config.identity  # weights.sha256 agrees
    record = json.loads((out / "configuration.json").read_text())["capworks_finetune"]
    assert record["base"]["model_id"] == base.model_id
    assert record["steps"] == 6 and record["revision"] == finetuned["report"]["revision"]
    engine = OfaEngine.load(config, device="cpu", batch_size=2)
    try:
        image = (finetuned["refs"].parent / "shifted-00000.png").read_bytes()
        (result,) = engine.caption_images([image])
    finally:
        engine.close()
    assert not isinstance(result, Exception) and result.caption.text


@pytest.mark.train
@pytest.mark.slow
@needs_train_venv
def test_an_unfetchable_and_an_undecodable_row_are_skipped_and_counted(
    finetuned: dict[str, Any],
) -> None:
    report = finetuned["report"]
    assert report["skipped"] == {"not_found": 1, "undecodable": 1}
    assert report["images"] == 32
    assert report["train_pairs"] + report["held_out_pairs"] == 30


@pytest.mark.train
@pytest.mark.slow
@needs_train_venv
def test_resume_after_a_sigkill_continues_from_the_last_saved_step(
    shapes_dir: Path, tmp_path: Path
) -> None:
    from capworks.finetune.trainer import last_checkpoint

    refs = shifted_references(tmp_path / "data", 24, seed=12)
    out, work = tmp_path / "model", tmp_path / "model.work"
    args = [
        str(Path(sys.executable).parent / "capworks"), "finetune", str(refs), "--model", "shapes",
        "--output", str(out), "--max-steps", "6", "--save-every", "2", "--held-out", "0", *QUICK,
    ]  # fmt: skip
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while (found := last_checkpoint(work)) is None or found[0] < 4:
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    assert not out.exists()
    saved = last_checkpoint(work)
    assert saved is not None and saved[0] >= 4
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["resumed_from"] == saved[0]
    assert [step for step, _ in report["losses"]] == list(range(saved[0] + 1, 7))
    assert report["steps"] == 6
    # The loss curve goes on from where it was: the first run's steps, then the resumed ones,
    # whose loss is below the untrained start's (a restart from the base would begin there).
    curve = [json.loads(line) for line in (work / "losses.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve][:4] == [1, 2, 3, 4]
    assert [c["step"] for c in curve][-2:] == [5, 6]
    assert report["losses"][0][1] < curve[0]["loss"]


@pytest.mark.train
@pytest.mark.slow
@needs_train_venv
def test_enqueue_with_the_finetuned_model_recaptions_what_the_base_captioned(
    finetuned: dict[str, Any], pipeline: Any
) -> None:
    from pipeline_support import query, wait_until
    from sqlalchemy import func, select

    from capworks.schema.checkpoint import resolve_identity
    from capworks.schema.settings import get_settings
    from capworks.schema.tables import Caption

    photos = pipeline.tmp / "photos"
    photos.mkdir()
    for source in sorted(finetuned["refs"].parent.glob("shifted-0000*.png"))[:6]:
        shutil.copyfile(source, photos / source.name)
    tuned = str(finetuned["out"])
    tuned_id = resolve_identity(tuned, None, get_settings().checkpoint_dir)[0]

    def per_model() -> dict[str, int]:
        stmt = select(Caption.model_id, func.count()).group_by(Caption.model_id)
        return dict(query(pipeline.db_url, lambda conn: conn.execute(stmt).all()))

    base = pipeline.cli("caption", str(photos), "--model", "shapes", "--no-progress")
    assert base.returncode == 0, base.stderr[-2000:]
    assert per_model() == {"shapes": 6}
    again = pipeline.cli("enqueue", str(photos), "--model", "shapes", "--no-progress")
    assert again.returncode == 0 and "enqueued 0 " in again.stdout, again.stdout + again.stderr
    new = pipeline.cli("enqueue", str(photos), "--model", tuned, "--no-progress")
    assert new.returncode == 0 and "enqueued 6 " in new.stdout, new.stdout + new.stderr
    pipeline.extra_env["CAPWORKS_MODEL"] = tuned  # a worker serving the fine-tuned model
    pipeline.start_worker("tuned")
    wait_until(lambda: per_model().get(tuned_id) == 6, 300, "6 captions by the fine-tuned model",
               lambda: pipeline.log_text("tuned")[-3000:])  # fmt: skip
    assert per_model() == {"shapes": 6, tuned_id: 6}  # both models' captions stay


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("refs.csv", "path,text\na.png,a cat\n", "missing column(s) uri, caption"),
        ("refs.jsonl", "\n", "no reference captions"),
        ("refs.json", '{"images": [], "annotations": []}', "no reference captions"),
    ],
)
def test_bad_references_get_one_line_and_a_non_zero_exit(
    tmp_path: Path, name: str, body: str, expected: str
) -> None:
    refs = tmp_path / name
    refs.write_text(body)
    done = run_cli("finetune", str(refs), "--output", str(tmp_path / "out"), "--model", "shapes")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(TRAIN_VENV, reason="the main venv's refusal: torchvision loads here")
def test_without_the_train_venv_finetune_says_how_to_get_it_in_one_line(tmp_path: Path) -> None:
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"uri": "a.png", "caption": "a red square"}) + "\n")
    done = run_cli("finetune", str(refs), "--output", str(tmp_path / "out"), "--model", "shapes")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "scripts/install.sh --train" in lines[0], done.stderr
