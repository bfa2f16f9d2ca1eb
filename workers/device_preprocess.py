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

In the image path the work is split at the decode seam: `JpegPassThrough` (the decode threads)
checks a JPEG's header and limits and hands its bytes on; `DevicePreprocessor.stage` (the
batcher's model thread, just before the model) decodes the batch's JPEGs on the model's device.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from capworks.schema.errors import CapworksError, ImageError
from capworks.workers.preprocess import (
    ExactDecoder,
    ImageLimits,
    JpegBytes,
    Normalization,
    PreparedImage,
    decode_safely,
    host_pixels,
    jpeg_scan_refusal,
)

log = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
_TRANSPOSING = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


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


def jpeg_upright_size(data: bytes, limits: ImageLimits) -> tuple[int, int] | None:
    """The upright (width, height) of a whole RGB or greyscale JPEG within the limits, from its
    header; None for anything the exact path must judge (other formats and modes, CMYK, a
    file cut short, a header Pillow refuses, an image over the limits, too many scans)."""
    if not data.startswith(JPEG_MAGIC) or len(data) > limits.max_bytes:
        return None
    if not data.rstrip(b"\0").endswith(JPEG_END):  # cut short: the exact path says `truncated`
        return None
    if jpeg_scan_refusal(data) is not None:  # the exact path refuses it before decoding
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if max(width, height) > limits.max_px:
        return None
    return (height, width) if orientation in _TRANSPOSING else (width, height)


@dataclass(frozen=True)
class JpegPassThrough:
    """The decode stage of `CAPWORKS_PREPROCESS=gpu`: a JPEG whose header passes is handed on
    encoded, for the model thread to decode on its device; anything else is decoded exactly."""

    exact: ExactDecoder

    def decode(self, data: bytes) -> PreparedImage:
        """The JPEG's bytes with its upright size, or the exact path's pixels (or error)."""
        size = jpeg_upright_size(data, self.exact.limits)
        if size is None:
            return self.exact.decode(data)
        return PreparedImage(JpegBytes(data), *size)


def _decode_jpeg_fn() -> object:
    try:
        from torchvision.io import decode_jpeg
    except (ImportError, RuntimeError, OSError) as exc:  # a torchvision built for another torch
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(  # a setting this installation cannot carry out: one line at start
            f"CAPWORKS_PREPROCESS=gpu needs torchvision built for torch {torch.__version__} "
            f"({reason}); unset it for the exact CPU path"
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
            pixels = torch.from_numpy(np.ascontiguousarray(host_pixels(exact))).to(self.device)
            rows[i] = (pixels, (exact.width_px, exact.height_px))
        index = sorted(rows)
        if index:
            pixels = torch.stack([rows[i][0] for i in index])
        else:
            pixels = torch.empty(0, 3, self.norm.size_px, self.norm.size_px, device=self.device)
        return DeviceBatch(pixels, [rows[i][1] for i in index], index, errors)

    def stage(
        self, images: Sequence[np.ndarray | JpegBytes]
    ) -> list[np.ndarray | torch.Tensor | CapworksError]:
        """The batcher's step before the model: the JPEGs left encoded decoded on the device in
        one call and resized there; one the device cannot decode goes the exact way (failing
        with its usual code if that fails too); pixels already prepared pass as they are."""
        at = [i for i, image in enumerate(images) if isinstance(image, JpegBytes)]
        blobs = [image.data for image in images if isinstance(image, JpegBytes)]
        decoded = self._decode_on_device(blobs)
        good = [(i, img) for i, img in zip(at, decoded, strict=True) if img is not None]
        on_device: dict[int, torch.Tensor] = {}
        if good:
            resized = resize_normalize([img for _, img in good], self.norm)
            on_device = {i: row for (i, _), row in zip(good, resized, strict=True)}
        if blobs:
            log.info("%d of %d JPEGs decoded on %s", len(good), len(blobs), self.device)
        out: list[np.ndarray | torch.Tensor | CapworksError] = []
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray):
                out.append(image)
            elif i in on_device:
                out.append(on_device[i])
            else:
                exact = decode_safely(self.exact, image.data)
                out.append(exact if isinstance(exact, ImageError) else host_pixels(exact))
        return out

    def _device_decodable(self, blob: bytes) -> bool:
        """A JPEG within the limits whose header Pillow reads; anything else goes the exact way."""
        return jpeg_upright_size(blob, self.limits) is not None

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
