"""The decoder alone against the bad-input table (no server, no model): every stored case
decodes, or fails with the table's code, and the pixels of the awkward formats are right."""

from __future__ import annotations

import numpy as np
import pytest

from badinput import cases
from badinput.cases import CAPTION, CASES, Case
from capworks.schema.errors import Code, ImageError
from capworks.workers.preprocess import ImageLimits, decode_image, identify_non_image

STORED = [c for c in CASES if c.placement == "stored"]


@pytest.mark.parametrize("case", STORED, ids=[c.kind for c in STORED])
def test_each_stored_case_decodes_or_fails_with_the_tables_code(
    case: Case, case_blobs: dict[str, bytes]
) -> None:
    data = case_blobs[case.kind]
    if case.expect == CAPTION:
        decoded = decode_image(data, ImageLimits())
        assert decoded.image.mode == "RGB"
        if case.upright_px is not None:
            assert (decoded.width_px, decoded.height_px) == case.upright_px
    else:
        with pytest.raises(ImageError) as info:
            decode_image(data, ImageLimits())
        assert info.value.code.value == case.expect and info.value.message


def _mean_rgb(data: bytes, box: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    pixels = np.asarray(decode_image(data, ImageLimits()).image, dtype=np.float64)
    return pixels[box].reshape(-1, 3).mean(axis=0)  # type: ignore[no-any-return]


def test_16_bit_grey_keeps_its_tones_instead_of_turning_white() -> None:
    data = cases.png16_grey()
    assert _mean_rgb(data, (slice(0, 20), slice(0, 20))) == pytest.approx([243] * 3, abs=2)
    assert _mean_rgb(data, (slice(40, 80), slice(50, 90))) == pytest.approx([13] * 3, abs=2)


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "ycck_jpeg", "png_16bit_rgb", "animated_gif"])
def test_awkward_encodings_of_the_scene_decode_to_its_colours(kind: str) -> None:
    case = next(c for c in CASES if c.kind == kind)
    want = np.asarray(cases.scene(), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert _mean_rgb(case.make()) == pytest.approx(want, abs=6)


def test_the_first_frame_of_an_animation_is_the_one_decoded() -> None:
    first = np.asarray(cases.scene(), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    second = np.asarray(cases.scene(cases.OTHER, 8), dtype=np.float64).reshape(-1, 3).mean(0)
    for fmt in ("GIF", "WEBP"):
        got = _mean_rgb(cases.animated(fmt)())
        assert np.abs(got - first).max() < 8 < np.abs(got - second).max()


@pytest.mark.parametrize(
    ("head", "code", "words"),
    [
        (b"\xef\xbb\xbf  <?xml version='1.0'?><svg/>", Code.UNSUPPORTED_FORMAT, "SVG"),
        (b"%PDF-1.7\n", Code.UNSUPPORTED_FORMAT, "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", Code.UNSUPPORTED_FORMAT, "HEIF"),
        (b"\n<HTML><body>503</body>", Code.UNDECODABLE, "HTML"),
        (b"PK\x03\x04\x14\x00", Code.UNDECODABLE, "ZIP"),
        (b"plain words\n", Code.UNDECODABLE, "text"),
        (b"\x13\x37\xfe\x00\x01", Code.UNDECODABLE, "not a recognisable image"),
    ],
)
def test_bytes_that_are_not_an_image_say_what_they_are(head: bytes, code: Code, words: str) -> None:
    got_code, reason = identify_non_image(head)
    assert got_code is code and words in reason
