"""One suffix policy for folders and buckets (issue 23 item 12): the same names are images in a
local folder, a bucket listing and a storage event, in any case, and `enqueue` says how many
listed names it skipped for their suffix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import s3_client
from pipeline_support import Pipeline, own_queue, queued_images

from capworks.producer.events.records import parse_body
from capworks.producer.imagenames import is_image_name

IMAGES = ["a.png", "B.JPG", "c.Jpeg", "sub/e.tiff"]
NOT_IMAGES = ["notes.txt", "d.png.bak", ".png", "sub/f"]


def test_the_image_suffixes_are_judged_on_the_last_name_in_any_case() -> None:
    assert [is_image_name(n) for n in IMAGES] == [True] * 4
    assert [is_image_name(n) for n in NOT_IMAGES] == [False] * 4
    assert is_image_name("s3://b/x.png/photo.WEBP")
    assert not is_image_name("s3://b/photos.png/readme")


def test_a_storage_event_takes_the_same_names_as_a_listing() -> None:
    records = [
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": k}}}
        for k in ("p/x.MPO", "p/y.png.bak", "p/z.Tif")
    ]
    created = parse_body(json.dumps({"Records": records})).created
    assert sorted(c.key for c in created) == ["p/x.MPO", "p/z.Tif"]


@pytest.fixture()
def farm(tmp_path: Path, s3_endpoint: str) -> Iterator[Pipeline]:
    with own_queue(f"sqlite:///{tmp_path / 'env.db'}", tmp_path, s3_endpoint) as p:
        yield p


def enqueued_names(p: Pipeline, source: str) -> tuple[list[str], str]:
    """What `capworks enqueue SOURCE` queued (names under the source) and what it printed."""
    result = p.cli("enqueue", source, "--no-progress")
    assert result.returncode == 0, result.stderr
    names = sorted(uri.split("/src/", 1)[1] for uri in queued_images(p))
    p.redis().delete(p.queue)
    return names, result.stdout


def test_a_folder_and_a_bucket_with_the_same_names_enqueue_the_same_images_and_say_so(
    farm: Pipeline,
) -> None:
    folder = farm.tmp / "src"
    s3 = s3_client(farm.s3_endpoint)
    s3.create_bucket(Bucket="suffixes")  # type: ignore[attr-defined]
    for name in IMAGES + NOT_IMAGES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not decoded at enqueue")
        s3.put_object(Bucket="suffixes", Key=f"src/{name}", Body=b"x")  # type: ignore[attr-defined]
    expected = sorted(IMAGES)
    for source in (str(folder), "s3://suffixes/src/"):
        names, out = enqueued_names(farm, source)
        assert names == expected, source
        assert "listed 8, skipped 4, enqueued 4" in out, out
        assert "4 names not ending in .bmp .gif .jpeg .jpg .mpo .png .tif .tiff .webp" in out
    # --suffix replaces the set, on both, in any case.
    result = farm.cli("enqueue", str(folder), "--no-progress", "--suffix", "JPG", "--force")
    assert result.returncode == 0, result.stderr
    assert "enqueued 1 in 1 jobs" in result.stdout
    assert "7 names not ending in .jpg (any case)" in result.stdout
