"""Batched JPEG decode and resize on a torch device (`CAPWORKS_PREPROCESS=gpu`; exact stays the
default).

`torchvision.io.decode_jpeg` decodes a list of JPEGs in one call (nvJPEG on CUDA), applying the
EXIF orientation as ModelScope's `ImageOps.exif_transpose` does; each image is then resized on
the device with torch's antialiased bicubic filter (Pillow's filter: a = -0.5, support widened
by the downscale factor), rounded and clamped to 8 bits as Pillow's resize is, scaled to [0, 1]
and normalised with the checkpoint's mean and std, and the batch is stacked there, so only the
encoded bytes cross to the device. Not bit-exact: another JPEG decoder (IDCT, chroma upsampling)
and float rather than fixed-point resampling differ from Pillow by a few grey levels, which can
change a caption; `bench/device_preprocess.py` measures how often.

Everything that is not a JPEG, that Pillow's header check refuses (size limits, truncation), or
that the device decoder fails on, goes through the exact CPU path one by one, so a bad image
fails alone with its usual error code.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from schema.errors import ImageError
from workers.preprocess import ExactDecoder, ImageLimits, Normalization, decode_safely

log = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DeviceBatch:
    """Model-ready pixels (images, 3, S, S) on the device for the images that decoded, with
    their original (width, height); failures keep their position in `errors`."""

    pixels: torch.Tensor
    sizes_px: list[tuple[int, int]]
    index: list[int]  # position in the input of each row of `pixels`
    errors: dict[int, ImageError]


def resize_normalize(images: Sequence[torch.Tensor], norm: Normalization) -> torch.Tensor:
    """uint8 CHW RGB images (any sizes, on one device) to a float32 (images, 3, S, S) batch."""
    if not images:
        raise ValueError("no images to resize")
    device = images[0].device
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(norm.std, dtype=torch.float32, device=device)[:, None, None]
    size = (norm.size_px, norm.size_px)
    out = torch.empty(len(images), 3, *size, dtype=torch.float32, device=device)
    for i, img in enumerate(images):
        x = img[None].float()
        if tuple(img.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        eight_bit = x.round_().clamp_(0, 255)[0]  # Pillow resizes to 8 bits
        out[i] = (eight_bit / 255 - mean) / std
    return out


def _decode_jpeg_fn() -> object:
    try:
        from torchvision.io import decode_jpeg
    except (ImportError, RuntimeError, OSError) as exc:  # a torchvision built for another torch
        raise RuntimeError(
            f"CAPWORKS_PREPROCESS=gpu needs torchvision built for torch {torch.__version__}: {exc}"
        ) from exc
    return decode_jpeg


class DevicePreprocessor:
    """Encoded images to a pixel batch on `device`, JPEGs decoded there in one call."""

    def __init__(self, limits: ImageLimits, norm: Normalization, device: torch.device) -> None:
        self.limits, self.norm, self.device = limits, norm, device
        self.exact = ExactDecoder(limits, norm)
        self._decode_jpeg = _decode_jpeg_fn()  # fails at start-up, not at the first batch

    def prepare_many(self, blobs: Sequence[bytes]) -> DeviceBatch:
        """Decode, validate, resize and normalise a batch; failures recorded per image."""
        errors: dict[int, ImageError] = {}
        rows: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        jpegs = [i for i, b in enumerate(blobs) if self._device_decodable(b)]
        decoded = self._decode_on_device([blobs[i] for i in jpegs])
        for i, img in zip(jpegs, decoded, strict=True):
            if img is not None:
                rows[i] = (resize_normalize([img], self.norm)[0], (img.shape[2], img.shape[1]))
        for i, blob in enumerate(blobs):
            if i in rows:
                continue
            exact = decode_safely(self.exact, blob)
            if isinstance(exact, ImageError):
                errors[i] = exact
                continue
            pixels = torch.from_numpy(np.ascontiguousarray(exact.pixels)).to(self.device)
            rows[i] = (pixels, (exact.width_px, exact.height_px))
        index = sorted(rows)
        if index:
            pixels = torch.stack([rows[i][0] for i in index])
        else:
            pixels = torch.empty(0, 3, self.norm.size_px, self.norm.size_px, device=self.device)
        return DeviceBatch(pixels, [rows[i][1] for i in index], index, errors)

    def _device_decodable(self, blob: bytes) -> bool:
        """A JPEG within the limits whose header Pillow reads; anything else goes the exact way."""
        if not blob.startswith(JPEG_MAGIC) or len(blob) > self.limits.max_bytes:
            return False
        from PIL import Image

        try:
            with Image.open(io.BytesIO(blob)) as img:
                w, h = img.size
        except (OSError, ValueError, Image.DecompressionBombError):
            return False
        return max(w, h) <= self.limits.max_px

    def _decode_on_device(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """uint8 CHW RGB tensors on the device; None where decoding failed (retried exactly)."""
        if not blobs:
            return []
        from torchvision.io import ImageReadMode

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decode = self._decode_jpeg
        try:
            out = decode(  # type: ignore[operator]
                data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
            )
            return list(out)
        except RuntimeError as exc:  # one bad image fails the whole call: isolate it
            log.info("batched device decode failed (%s); decoding one by one", exc)
        result: list[torch.Tensor | None] = []
        for d in data:
            try:
                result.append(
                    decode(  # type: ignore[operator]
                        d, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
                    )
                )
            except RuntimeError:
                result.append(None)
        return result
