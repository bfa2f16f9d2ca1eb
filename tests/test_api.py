"""The Python API (issue 23, item 8): `from capworks import Captioner` captions paths, folders,
bytes and PIL images through the command's image path, with typed results and failure codes;
`capworks.enqueue` publishes jobs; the README's example runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, png_bytes, run_cli
from pipeline_support import REDIS_URL, captions, live_redis

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.settings import Settings


@pytest.fixture(scope="module")
def captioner(shapes_dir: Path) -> object:
    from capworks import Captioner

    with Captioner(model="shapes", device="cpu", batch_size=4) as loaded:
        yield loaded


def test_paths_folders_bytes_and_pil_images_are_captioned_as_the_command_captions_them(
    captioner: object, tmp_path: Path
) -> None:
    from capworks import CaptionResult

    scenes = sample_scenes(3, seed=11)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(scenes[0][0]))
    single = tmp_path / "b.png"
    single.write_bytes(png_bytes(scenes[1][0]))
    pil_image = scenes[2][0]

    results = captioner.caption(  # type: ignore[attr-defined]
        [folder, str(single), png_bytes(scenes[0][0]), pil_image, b"not an image"]
    )

    assert all(isinstance(r, CaptionResult) for r in results)
    assert [r.ok for r in results] == [True, True, True, True, False]
    assert results[0].source == str(folder / "a.png") and results[1].source == str(single)
    assert results[2].source.startswith("sha256:")
    assert results[4].error == "undecodable" and results[4].caption is None
    assert results[0].caption == results[2].caption, "the same pixels, as a path or as bytes"
    first = results[0]
    assert first.score is not None and first.alternatives and first.tags
    assert isinstance(first.tags, dict) and first.width_px == scenes[0][0].width
    # The command line captions the same files the same way (one image path, not two).
    cli = run_cli(
        "caption",
        str(folder),
        str(single),
        "--model",
        "shapes",
        "--json",
        "--no-progress",
        "--db",
        f"sqlite:///{tmp_path / 'cli.db'}",
    )
    assert cli.returncode == 0, cli.stderr
    by_uri = {row["uri"]: row for row in map(json.loads, cli.stdout.splitlines())}
    for result in results[:2]:
        row = by_uri[result.source]
        assert (row["caption"], row["score"]) == (result.caption, round(result.score or 0, 4))
    truths = [caption for _, caption in scenes]
    expected = [*truths[:2], truths[0], truths[2]]
    right = sum(r.caption == t for r, t in zip(results[:4], expected, strict=True))
    assert right >= 3, [r.caption for r in results]


def test_one_image_alone_is_a_list_of_one_result(captioner: object) -> None:
    ((img, _),) = sample_scenes(1, seed=12)
    (result,) = captioner.caption(img)  # type: ignore[attr-defined]
    assert result.ok and result.caption


def test_a_captioner_with_a_database_writes_every_result_there(
    shapes_dir: Path, tmp_path: Path
) -> None:
    from capworks import Captioner

    path = tmp_path / "c.png"
    path.write_bytes(png_bytes(sample_scenes(1, seed=13)[0][0]))
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with Captioner(model="shapes", device="cpu", db=url) as with_db:
        (result,) = with_db.caption([path])
    assert captions(url) == {str(path): result.caption}


def test_capworks_enqueue_publishes_jobs_for_the_workers() -> None:
    import capworks

    client = live_redis()
    queue = "capworks-test-api-enqueue"
    client.delete(queue)
    try:
        ids = capworks.enqueue(
            ["s3://bucket/a.jpg", "s3://bucket/b.jpg"],
            settings=Settings(broker_url=REDIS_URL, queue_name=queue),
        )
        assert len(ids) == 1 and client.llen(queue) == 1
    finally:
        client.delete(queue)


def test_importing_capworks_loads_no_model_library() -> None:
    code = "import sys, capworks; print(sorted({'torch', 'modelscope'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_readme_example_runs_as_written(shapes_dir: Path, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(from capworks import Captioner\n.*?)```", readme, re.S)
    assert block is not None, "README has a Python API example"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (img, _) in enumerate(sample_scenes(2, seed=14)):
        (photos / f"p{i}.png").write_bytes(png_bytes(img))
    out = subprocess.run(
        [sys.executable, "-c", block.group(1)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert str(photos / "p0.png") in out.stdout or "photos/p0.png" in out.stdout, out.stdout
