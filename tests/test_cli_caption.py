"""`capworks caption` end to end, as a user runs it: folders into SQLite and PostgreSQL, an
s3:// prefix on a real S3 server, re-runs that add no rows, and bad command lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import png_bytes, run_cli, s3_client
from pipeline_support import captions, count_rows
from sqlalchemy import create_engine, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.tables import Image

SEED = 23


def write_folder(folder: Path, count: int, engine: Any) -> dict[str, str]:
    """Sample images in nested folders; returns path -> the caption the engine gives it here.

    The model is right on nearly every image (100% of its held-out set), and the command must
    give each file exactly the caption the engine gives its bytes.
    """
    paths, blobs, truth = [], [], []
    for i, (img, caption) in enumerate(sample_scenes(count, SEED)):
        path = folder / f"part{i % 2}" / f"img {i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(img))
        paths.append(str(path.resolve()))
        blobs.append(path.read_bytes())
        truth.append(caption)
    got = [r.caption.text for r in engine.caption_images(blobs)]
    assert sum(g == t for g, t in zip(got, truth, strict=True)) >= count - 1
    return dict(zip(paths, got, strict=True))


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, shapes_engine: Any
) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("images")
    expected = write_folder(root, 12, shapes_engine)
    (root / "part0" / "broken.jpg").write_bytes(b"not an image at all")
    return root, expected


def test_caption_folder_into_sqlite_twice_adds_no_rows(
    folder: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, expected = folder
    url = f"sqlite:///{tmp_path / 'c.db'}"
    first = run_cli("caption", str(root), "--model", "shapes", "--db", url, "--batch-size", "5")
    assert first.returncode == 3, first.stderr  # some images failed
    assert "captioning" in first.stderr and "img/s" in first.stderr  # the progress bar
    # Into a pipe: a line per image, the summary on stderr.
    assert "11 captioned" not in first.stderr and "12 captioned, 1 failed" in first.stderr
    assert len(first.stdout.splitlines()) == 13
    assert captions(url) == expected
    counts = count_rows(url)
    assert counts["images"] == 13 and counts["captions"] == 12 and counts["failures"] == 1
    again = run_cli("caption", str(root), "--model", "shapes", "--db", url)
    assert again.returncode == 3, again.stderr
    assert count_rows(url) == counts


def test_caption_folder_into_postgresql_as_json(
    folder: tuple[Path, dict[str, str]], pg_url: str
) -> None:
    root, expected = folder
    result = run_cli("caption", str(root), "--model", "shapes", "--db", pg_url, "--json")
    assert result.returncode == 3, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {d["uri"]: d["caption"] for d in lines if "caption" in d} == expected
    assert [d["error"] for d in lines if "error" in d] == ["undecodable"]
    assert all(len(d["alternatives"]) == 4 for d in lines if "caption" in d)
    assert captions(pg_url) == expected
    counts = count_rows(pg_url)
    run_cli("caption", str(root), "--model", "shapes", "--db", pg_url, "--json")
    assert count_rows(pg_url) == counts


def test_caption_s3_prefix_on_seaweedfs(
    s3_endpoint: str, shapes_engine: Any, tmp_path: Path
) -> None:
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="photos")  # type: ignore[attr-defined]
    expected = {}
    keys = ["2024/a cat.png", "2024/b+c.png", "2024/sub/ünï.png", "2024/d.png", "other/x.png"]
    for key, (img, _) in zip(keys, sample_scenes(len(keys), SEED + 1), strict=True):
        body = png_bytes(img)
        s3.put_object(Bucket="photos", Key=key, Body=body)  # type: ignore[attr-defined]
        expected[f"s3://photos/{key}"] = shapes_engine.caption_images([body])[0].caption.text
    del expected["s3://photos/other/x.png"]
    url = f"sqlite:///{tmp_path / 's3.db'}"
    env = {
        "CAPWORKS_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CAPWORKS_S3_ADDRESSING_STYLE": "path",
    }
    result = run_cli("caption", "s3://photos/2024/", "--model", "shapes", "--db", url, env=env)
    assert result.returncode == 0, result.stderr
    assert captions(url) == expected
    engine = create_engine(url)
    with engine.connect() as conn:
        etags = set(conn.scalars(select(Image.etag)))
        buckets = set(conn.scalars(select(Image.bucket)))
    assert buckets == {"photos"} and None not in etags and len(etags) == 4
    counts = count_rows(url)
    run_cli("caption", "s3://photos/2024/", "--model", "shapes", "--db", url, env=env)
    assert count_rows(url) == counts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "/no/such/folder", "--model", "shapes"], "no such file or directory"),
        (["caption", ".", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["caption", ".", "--batch-size", "0"], "must be at least 1"),
        (["caption"], "required: INPUT"),
        (
            ["caption", ".", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"],
            "cannot reach database",
        ),
        (["caption", ".", "--db", "notadb://x"], "bad database URL"),
        (["caption", ".", "--allow-address", "10.0.0.1/8"], "not a network like 10.0.0.0/8"),
    ],
)
def test_bad_command_line_exits_nonzero_with_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("capworks") and message in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CAPWORKS_JOB_IMAGES": "abc"},
            "CAPWORKS_JOB_IMAGES='abc': Input should be a valid integer",
        ),
        ({"CAPWORKS_LEASE_S": "0"}, "CAPWORKS_LEASE_S='0': Input should be greater than or equal"),
        ({"CAPWORKS_START_WAIT_S": "-1"}, "CAPWORKS_START_WAIT_S='-1'"),
    ],
)
def test_a_bad_setting_is_named_in_one_line(env: dict[str, str], message: str) -> None:
    result = run_cli("dlq", "list", env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capworks: error: bad setting"), result.stderr
    assert message in lines[0]


def test_unreachable_hub_says_how_to_use_a_local_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(sample_scenes(1, 1)[0][0]))
    result = run_cli(
        "caption",
        str(tmp_path),
        "--db",
        f"sqlite:///{tmp_path / 'x.db'}",
        # The hub: a closed port on loopback (no packet leaves the machine).
        env={
            "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
            "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
        },
        timeout=300,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    # What is being looked up, said before it starts, then the error.
    assert len(lines) == 2 and "ModelScope hub id" in lines[0], result.stderr
    assert "damo/ofa_image-caption_coco_distilled_en" in lines[1] and "local folder" in lines[1]
