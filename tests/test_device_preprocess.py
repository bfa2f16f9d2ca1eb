"""Device preprocessing (CAPWORKS_PREPROCESS=gpu), run here with device="cpu": the resize is
Pillow's within a grey level or two, JPEGs decode in one call with failures kept in their slots,
and without a torchvision built for this torch it refuses to start with one clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from schema.errors import ImageError
from workers.device_preprocess import DevicePreprocessor, resize_normalize
from workers.preprocess import ImageLimits, Normalization, to_pixels

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


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


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
    with pytest.raises(RuntimeError, match="needs torchvision built for torch"):
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
