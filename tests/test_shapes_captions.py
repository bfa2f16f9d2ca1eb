"""The real OFA path on the trained `shapes` checkpoint captions synthetic images correctly,
whatever the batch size and order, and bad images fail alone."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import png_bytes

from capworks.checkpoints.build import HELD_OUT_COUNT, HELD_OUT_SEED, MIN_HELD_OUT_EXACT
from capworks.checkpoints.shapes_world import all_scenes, sample_scenes
from capworks.schema.errors import Code, ImageError
from capworks.workers.engine import CaptionedImage

TEST_SEED = 11
COUNT = 40


@pytest.fixture(scope="module")
def samples() -> list[tuple[bytes, str]]:
    return [(png_bytes(img), caption) for img, caption in sample_scenes(COUNT, TEST_SEED)]


def texts(results: list[Any]) -> list[str]:
    return [r.caption.text if isinstance(r, CaptionedImage) else r.code.value for r in results]


def test_caption_language_has_enough_distinct_captions() -> None:
    assert len({s.caption for s in all_scenes()}) >= 24


def test_shapes_checkpoint_captions_95_percent_of_held_out_images_exactly(
    shapes_engine: Any,
) -> None:
    # Measured again with today's engine, not read back from the build's own record.
    held_out = sample_scenes(HELD_OUT_COUNT, HELD_OUT_SEED)
    got = texts(shapes_engine.caption_images([png_bytes(img) for img, _ in held_out]))
    exact = sum(g == want for g, (_, want) in zip(got, held_out, strict=True)) / len(held_out)
    assert exact >= MIN_HELD_OUT_EXACT


def test_each_synthetic_image_gets_its_expected_caption(
    shapes_engine: Any, samples: list[tuple[bytes, str]]
) -> None:
    got = texts(shapes_engine.caption_images([b for b, _ in samples]))
    assert len({c for _, c in samples}) >= 20  # the sample spans many distinct captions
    assert got == [c for _, c in samples]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 16])
def test_captions_do_not_depend_on_batch_size_or_order(
    shapes_engine: Any, samples: list[tuple[bytes, str]], batch_size: int
) -> None:
    subset = samples[:16]
    order = list(range(len(subset)))
    random.Random(batch_size).shuffle(order)
    shapes_engine.batch_size = batch_size
    try:
        got = texts(shapes_engine.caption_images([subset[i][0] for i in order]))
    finally:
        shapes_engine.batch_size = 8
    assert got == [subset[i][1] for i in order]


def test_bad_images_fail_with_distinct_codes_while_the_batch_is_captioned(
    shapes_engine: Any, samples: list[tuple[bytes, str]]
) -> None:
    from PIL import Image

    good = samples[:4]
    jpeg = png_bytes(sample_scenes(1, 99)[0][0], "JPEG")
    huge = png_bytes(Image.new("L", (3001, 16)))
    blobs = [
        good[0][0],
        b"",
        good[1][0],
        jpeg[: len(jpeg) // 2],
        good[2][0],
        b"plain text pretending to be a jpeg\n" * 10,
        huge,
        good[3][0],
    ]
    results = shapes_engine.caption_images(blobs)
    codes = [r.code for r in results if isinstance(r, ImageError)]
    assert codes == [Code.EMPTY, Code.TRUNCATED, Code.UNDECODABLE, Code.TOO_LARGE_PIXELS]
    assert [r.caption.text for r in results if isinstance(r, CaptionedImage)] == [
        c for _, c in good
    ]
