"""Preprocessing is bit-exact to ModelScope's formula, and bad images fail with distinct codes."""

from __future__ import annotations

import io
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from capworks.schema.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from capworks.schema.errors import Code, ImageError
from capworks.workers.preprocess import (
    ExactDecoder,
    ImageLimits,
    Normalization,
    decode_image,
    prepare_image,
    preprocess_many,
)


def reference_pixels(
    data: bytes, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """ModelScope's path written with torch ops as torchvision's ToTensor and Normalize do it."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return t.sub(m).div(s).numpy()


def encoded(mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(64)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


CASES = [
    ("RGB", (640, 480), "JPEG"),
    ("RGB", (31, 97), "PNG"),
    ("L", (300, 200), "PNG"),
    ("RGBA", (123, 321), "PNG"),
    ("P", (200, 150), "PNG"),
    ("CMYK", (256, 192), "JPEG"),
    ("RGB", (1000, 40), "WEBP"),
]


@pytest.mark.parametrize(("mode", "size", "fmt"), CASES)
@pytest.mark.parametrize("size_px", [480, 64])
def test_preprocessing_is_bit_exact_to_the_reference_formula(
    mode: str, size: tuple[int, int], fmt: str, size_px: int
) -> None:
    data = encoded(mode, size, fmt)
    norm = Normalization(size_px)
    got = prepare_image(data, ImageLimits(), norm)
    want = reference_pixels(data, size_px, norm.mean, norm.std)
    assert got.pixels.dtype == np.float32 and got.pixels.shape == (3, size_px, size_px)
    assert np.array_equal(got.pixels, want)
    assert (got.width_px, got.height_px) == size


def test_imagenet_normalisation_is_bit_exact() -> None:
    data = encoded("RGB", (333, 222), "PNG", seed=3)
    norm = Normalization(96, IMAGENET_MEAN, IMAGENET_STD)
    assert np.array_equal(
        prepare_image(data, ImageLimits(), norm).pixels,
        reference_pixels(data, 96, IMAGENET_MEAN, IMAGENET_STD),
    )


def exif_rotated_jpeg() -> bytes:
    """A 300x100 JPEG whose EXIF says 'rotate 90 clockwise' (orientation 6)."""
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 50, 100))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_rotated_jpeg_is_turned_upright_before_resizing() -> None:
    data = exif_rotated_jpeg()
    got = prepare_image(data, ImageLimits(), Normalization(64))
    assert (got.width_px, got.height_px) == (100, 300)  # upright: portrait
    assert np.array_equal(got.pixels, reference_pixels(data, 64, (0.5,) * 3, (0.5,) * 3))
    # After rotating 90 degrees clockwise the blue stripe is at the top.
    top, bottom = got.pixels[:, 2, 32], got.pixels[:, -3, 32]
    assert top[2] > top[0] and bottom[0] > bottom[2]


def truncated_jpeg() -> bytes:
    data = encoded("RGB", (400, 300), "JPEG", seed=5)
    return data[: len(data) // 2]


BAD = {
    "zero bytes": (b"", Code.EMPTY),
    "truncated jpeg": (truncated_jpeg(), Code.TRUNCATED),
    "text named .jpg": (b"this is not an image, it is a text file\n" * 20, Code.UNDECODABLE),
    "over the pixel limit": (encoded("L", (3001, 10), "PNG"), Code.TOO_LARGE_PIXELS),
    "over the byte limit": (bytes(64) + encoded("RGB", (2000, 2000), "PNG"), None),
}


@pytest.mark.parametrize(
    "name", ["zero bytes", "truncated jpeg", "text named .jpg", "over the pixel limit"]
)
def test_bad_image_fails_with_its_own_code(name: str) -> None:
    data, code = BAD[name]
    with pytest.raises(ImageError) as info:
        decode_image(data, ImageLimits(max_px=3000))
    assert info.value.code is code


def test_bad_images_have_distinct_codes() -> None:
    codes = set()
    for name in ("zero bytes", "truncated jpeg", "text named .jpg", "over the pixel limit"):
        with pytest.raises(ImageError) as info:
            decode_image(BAD[name][0], ImageLimits())
        codes.add(info.value.code)
    assert len(codes) == 4


def test_image_over_the_byte_limit_fails_before_decoding() -> None:
    data = encoded("RGB", (500, 500), "PNG")
    with pytest.raises(ImageError) as info:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert info.value.code is Code.TOO_LARGE_BYTES


def test_jpeg_with_a_broken_header_is_undecodable() -> None:
    data = b"\xff\xd8\xff\xe0 this is no jpeg at all" * 10
    with pytest.raises(ImageError) as info:
        decode_image(data, ImageLimits())
    assert info.value.code is Code.UNDECODABLE


def test_unsupported_format_is_named() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(ImageError) as info:
        decode_image(buf.getvalue(), ImageLimits())
    assert info.value.code is Code.UNSUPPORTED_FORMAT


def test_decompression_bomb_is_refused_without_decoding() -> None:
    # 60000 x 60000 declared in the header; decoding it would need 10 GB.
    data = encoded("L", (60, 60), "PNG")
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = (60000).to_bytes(4, "big") * 2
    bomb = data[:12] + bytes(ihdr) + zlib.crc32(ihdr).to_bytes(4, "big") + data[33:]
    with pytest.raises(ImageError) as info:
        decode_image(bomb, ImageLimits(max_px=100000))
    assert info.value.code is Code.TOO_LARGE_PIXELS


def test_a_bad_image_keeps_its_slot_and_the_others_are_prepared() -> None:
    blobs = [encoded("RGB", (50, 50), "PNG"), b"", encoded("L", (70, 20), "JPEG")]
    with ThreadPoolExecutor(2) as pool:
        out = preprocess_many(blobs, ExactDecoder(ImageLimits(), Normalization(32)), pool)
    assert isinstance(out[1], ImageError) and out[1].code is Code.EMPTY
    assert not isinstance(out[0], ImageError) and out[0].pixels.shape == (3, 32, 32)
    assert not isinstance(out[2], ImageError) and out[2].width_px == 70
