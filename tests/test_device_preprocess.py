"""Device preprocessing (CAPWORKS_PREPROCESS=gpu), run here with device="cpu": the resize is
Pillow's within a grey level or two, JPEGs decode in one call with failures kept in their slots,
and without a torchvision built for this torch it refuses to start with one clear error. Its
decode stage hands a JPEG on encoded with its upright size and decodes everything else exactly;
its model-thread stage decodes the JPEGs on the device and fails a broken one alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from capworks.schema.errors import Code, ImageError
from capworks.workers.device_preprocess import DevicePreprocessor, JpegPassThrough, resize_normalize
from capworks.workers.preprocess import (
    ExactDecoder,
    ImageLimits,
    JpegBytes,
    Normalization,
    decode_safely,
    to_pixels,
)

NORM = Normalization(96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients with edges and a little noise: what a photo's pixels look like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    base[(x // 37 + y // 23) % 2 == 0] += 40
    pixels = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def upright_on_its_side(img: Image.Image) -> bytes:
    """A JPEG whose EXIF says to rotate it a quarter turn (width and height swap)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encoded(img, "JPEG", exif=exif.tobytes())


def without_its_scan(jpeg: bytes) -> bytes:
    """A JPEG whose header reads but whose image data is missing (an end marker right after)."""
    return jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9"


def torchvision_usable() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@pytest.mark.parametrize("size", [(640, 480), (97, 211), (96, 96), (1200, 300)])
def test_device_resize_is_pillows_bicubic_within_two_grey_levels(size: tuple[int, int]) -> None:
    img = photo(*size, seed=size[0])
    want = to_pixels(img, NORM)
    rgb = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    got = resize_normalize([rgb], NORM)[0].numpy()
    std = np.asarray(NORM.std, np.float32)[:, None, None]
    grey_levels = np.abs(got - want) * std * 255  # back to 8-bit units
    assert grey_levels.max() <= 2.01
    assert grey_levels.mean() < 0.25  # measured 0.00-0.13 (upscaling and downscaling)


def test_device_resize_stacks_images_of_different_sizes() -> None:
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(50, 80), (96, 96)]]
    batch = resize_normalize(images, NORM)
    assert batch.shape == (2, 3, 96, 96) and batch.dtype == torch.float32


@pytest.mark.skipif(torchvision_usable(), reason="torchvision works with this torch")
def test_device_preprocessing_without_a_matching_torchvision_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="needs torchvision built for torch"):
        DevicePreprocessor(ImageLimits(), NORM, CPU)


@pytest.mark.skipif(not torchvision_usable(), reason="no torchvision built for this torch")
def test_device_preprocessor_decodes_jpegs_in_one_call_and_keeps_failures_in_their_slots() -> None:
    blobs = [
        encoded(photo(320, 240, 1), "JPEG"),
        encoded(photo(200, 300, 2), "PNG"),  # not a JPEG: the exact path
        b"\xff\xd8\xff\xe0 not really a jpeg",
        encoded(photo(640, 480, 3), "JPEG"),
    ]
    batch = DevicePreprocessor(ImageLimits(), NORM, CPU).prepare_many(blobs)
    assert batch.index == [0, 1, 3]
    assert isinstance(batch.errors[2], ImageError)
    assert batch.pixels.shape == (3, 3, 96, 96)
    assert batch.sizes_px == [(320, 240), (200, 300), (640, 480)]
    exact = to_pixels(photo(200, 300, 2), NORM)
    assert np.array_equal(batch.pixels[1].numpy(), exact)  # the PNG went the exact way


def test_the_gpu_decode_stage_hands_a_jpeg_on_encoded_with_its_upright_size() -> None:
    data = upright_on_its_side(photo(320, 240, 4))
    exact = ExactDecoder(ImageLimits(), NORM)
    handed_on = JpegPassThrough(exact).decode(data)
    decoded = exact.decode(data)
    assert handed_on.pixels == JpegBytes(data)
    assert (handed_on.width_px, handed_on.height_px) == (decoded.width_px, decoded.height_px)
    assert (handed_on.width_px, handed_on.height_px) == (240, 320)


@pytest.mark.parametrize(
    "kind", ["png", "cmyk_jpeg", "cut_short_jpeg", "not_a_jpeg", "too_many_px", "empty"]
)
def test_the_gpu_decode_stage_decodes_everything_else_exactly_with_its_usual_code(
    kind: str,
) -> None:
    jpeg = encoded(photo(240, 200, 5), "JPEG")
    data = {
        "png": encoded(photo(200, 300, 6), "PNG"),
        "cmyk_jpeg": encoded(photo(200, 300, 7).convert("CMYK"), "JPEG"),
        "cut_short_jpeg": jpeg[: len(jpeg) // 2],
        "not_a_jpeg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "too_many_px": encoded(photo(400, 100, 8), "JPEG"),
        "empty": b"",
    }[kind]
    exact = ExactDecoder(ImageLimits(max_px=300), NORM)
    got = decode_safely(JpegPassThrough(exact), data)
    want = decode_safely(exact, data)
    if isinstance(want, ImageError):
        assert isinstance(got, ImageError) and got.code == want.code
        assert kind != "cut_short_jpeg" or got.code is Code.TRUNCATED
    else:
        assert not isinstance(got, ImageError) and isinstance(got.pixels, np.ndarray)
        assert np.array_equal(got.pixels, want.pixels)
        assert (got.width_px, got.height_px) == (want.width_px, want.height_px)


@pytest.mark.skipif(not torchvision_usable(), reason="no torchvision built for this torch")
def test_the_device_stage_decodes_jpegs_on_the_device_and_fails_a_broken_one_alone() -> None:
    good = encoded(photo(320, 240, 9), "JPEG", quality=90)
    broken = without_its_scan(good)  # its header passes the decode stage
    host = to_pixels(photo(100, 80, 10), NORM)
    exact = ExactDecoder(ImageLimits(), NORM)
    staged = DevicePreprocessor(ImageLimits(), NORM, CPU).stage(
        [JpegBytes(good), JpegBytes(broken), host]
    )
    assert isinstance(staged[0], torch.Tensor) and staged[0].shape == (3, 96, 96)
    want = exact.decode(good).pixels
    std = np.asarray(NORM.std, np.float32)[:, None, None]
    grey_levels = np.abs(staged[0].numpy() - want) * std * 255
    assert grey_levels.max() <= 3.01 and grey_levels.mean() < 0.5
    expected = decode_safely(exact, broken)
    assert isinstance(expected, ImageError) and expected.code is Code.UNDECODABLE
    assert isinstance(staged[1], ImageError) and staged[1].code is expected.code
    assert staged[2] is host
