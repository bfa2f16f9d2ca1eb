"""Image decoding and validation, and OFA's preprocessing (bit-exact to ModelScope's).

ModelScope loads an image with `Image.open` -> `ImageOps.exif_transpose` -> `convert("RGB")`,
resizes it to S x S with bicubic filtering (aspect ratio not kept), scales to [0, 1] and
normalises with the checkpoint's mean and std. `ExactDecoder` does the same with Pillow and numpy;
the image path runs it in threads (Pillow and numpy release the GIL while decoding, resizing and
scaling, so threads use every core without copying pixels between processes).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capworks.schema.errors import Code, ImageError

log = logging.getLogger(__name__)
# Pillow warns about inputs it handles anyway (a palette image's transparency, EXIF it cannot
# parse); the image is decoded or fails with a code, and the user can do nothing about the
# warning. Filters set once here are process-wide and thread-safe, unlike catch_warnings.
warnings.filterwarnings("ignore", message="Palette images with Transparency", module="PIL")
warnings.filterwarnings("ignore", message="Corrupt EXIF data", module="PIL")
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
# libjpeg makes a pass over the whole image per scan: a normal progressive JPEG has about 10, a
# hostile one hundreds of thousands in 10 MB (each a few bytes long, each a pass).
MAX_JPEG_SCANS = 100
# Walking marker segments costs Python time per segment; real files have a few dozen.
MAX_JPEG_SEGMENTS = 10_000
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything
# else (after optional 0xFF fill bytes) is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be; larger ones fail with a specific code."""

    max_bytes: int = 10 * 1024 * 1024
    max_px: int = 3000


@dataclass(frozen=True)
class Normalization:
    """The resize target and per-channel mean and std of a checkpoint."""

    size_px: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image, upright, with its original dimensions."""

    image: Image.Image
    width_px: int
    height_px: int


def decode_image(data: bytes, limits: ImageLimits, draft_px: int = 0) -> DecodedImage:
    """Decode encoded bytes to an upright RGB image, or raise `ImageError` with a specific code.

    `draft_px` > 0 lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, to no less
    than that size (Pillow's `draft`): much faster on large photos, but the pixels are not
    ModelScope's, so it is off unless asked for. Reported dimensions are the original ones."""
    if not data:
        raise ImageError(Code.EMPTY, "zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(
            Code.TOO_LARGE_BYTES,
            f"at least {len(data)} bytes, over the limit of {limits.max_bytes}",
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) between 1x and 2x its bomb limit; we check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        code, what = identify_non_image(data)
        raise ImageError(code, what) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(Code.TOO_LARGE_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # a header Pillow recognised but cannot read
        if _riff_cut_short(data):  # libwebp refuses a cut-off WebP at open, not at load
            raise ImageError(Code.TRUNCATED, f"WebP file is truncated: {exc}") from exc
        raise ImageError(Code.UNDECODABLE, f"bad header: {exc}") from exc
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(Code.UNSUPPORTED_FORMAT, f"format {img.format} is not supported")
    width, height = img.size
    if width > limits.max_px or height > limits.max_px:
        raise ImageError(
            Code.TOO_LARGE_PIXELS,
            f"{width}x{height} px is over the limit of {limits.max_px}x{limits.max_px}",
        )
    if img.format in ("JPEG", "MPO"):
        too_costly = jpeg_scan_refusal(data)
        if too_costly is not None:
            raise ImageError(Code.TOO_MANY_SCANS, f"JPEG refused before decoding: {too_costly}")
    if draft_px and img.format == "JPEG":
        img.draft("RGB", (draft_px, draft_px))
    try:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    except OSError as exc:
        raise ImageError(_read_error_code(exc), str(exc)) from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageError(Code.UNDECODABLE, str(exc)) from exc
    if rgb.size == img.size or rgb.size == img.size[::-1]:
        upright = (width, height) if rgb.size == img.size else (height, width)
    else:  # pragma: no cover - exif_transpose keeps or swaps the size
        upright = rgb.size
    return DecodedImage(rgb, *upright)


def jpeg_scan_refusal(data: bytes) -> str | None:
    """Why a JPEG's scans make it too costly to decode (None: they do not): more than
    `MAX_JPEG_SCANS` start-of-scan segments, or more than `MAX_JPEG_SEGMENTS` segments in all,
    counted by walking the marker segments up to the end of the first image, stopping at the
    first bound passed. What the walk cannot read (a file cut short) is left to the decoder."""
    if not data.startswith(b"\xff\xd8"):
        return None
    scans = segments = 0
    pos = 2
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None  # not a marker where one is due: the decoder judges it
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker == _EOI:
            return None
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"more than {MAX_JPEG_SEGMENTS} marker segments"
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"more than {MAX_JPEG_SCANS} scans (a decoder pass each)"
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start()
    return None


# Leading bytes of what is often stored under an image's name but is not one Pillow reads.
_NOT_IMAGES: tuple[tuple[bytes, Code, str], ...] = (
    (b"%PDF-", Code.UNSUPPORTED_FORMAT, "a PDF document; only raster images are supported"),
    (b"<svg", Code.UNSUPPORTED_FORMAT, "an SVG (vector) image; only raster images are supported"),
    (b"<!doctype html", Code.UNDECODABLE, "an HTML document, not an image"),
    (b"<html", Code.UNDECODABLE, "an HTML document, not an image"),
    (b"PK\x03\x04", Code.UNDECODABLE, "a ZIP archive, not an image"),
)


def identify_non_image(data: bytes) -> tuple[Code, str]:
    """The code and reason for bytes Pillow does not recognise: SVG, PDF and HEIC/AVIF are
    image formats capworks does not read; HTML (an error page), archives and text are not images."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<?xml") and b"<svg" in head:
        head = head[head.index(b"<svg") :]
    for magic, code, what in _NOT_IMAGES:
        if head.startswith(magic.lower()):
            return code, what
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis"):
        return Code.UNSUPPORTED_FORMAT, f"a {data[8:12].decode()} (HEIF/AVIF) image"
    if _is_text(data[:1024]):
        return Code.UNDECODABLE, "text, not an image"
    return Code.UNDECODABLE, "not a recognisable image"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def _riff_cut_short(data: bytes) -> bool:
    """A RIFF (WebP) file shorter than its header says."""
    declared = int.from_bytes(data[4:8], "little") + 8
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and declared > len(data)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as ModelScope converts it, except 16- and 32-bit greyscale: Pillow clips those to
    8 bits (a 16-bit grey picture would come out white), so they are scaled down first."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.uint32)
        shift = 8 if img.mode.startswith("I;16") or int(wide.max(initial=0)) <= 0xFFFF else 24
        img = Image.fromarray((wide >> shift).astype(np.uint8), "L")
    return img.convert("RGB")


def _read_error_code(exc: Exception) -> Code:
    return Code.TRUNCATED if "truncated" in str(exc).lower() else Code.UNDECODABLE


def to_pixels(image: Image.Image, norm: Normalization) -> np.ndarray:
    """Resize and normalise one image to a CHW float32 array, exactly as ModelScope does."""
    resized = image.convert("RGB").resize((norm.size_px, norm.size_px), Image.Resampling.BICUBIC)
    scaled: np.ndarray = np.asarray(resized).astype(np.float32) / np.float32(255)
    normed: np.ndarray = (scaled - np.asarray(norm.mean, np.float32)) / np.asarray(
        norm.std, np.float32
    )
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


@dataclass(frozen=True)
class JpegBytes:
    """A JPEG whose header passed the checks, left encoded: the model thread decodes it on its
    device with the rest of its batch (`CAPWORKS_PREPROCESS=gpu`, workers/device_preprocess.py)."""

    data: bytes


@dataclass(frozen=True)
class PreparedImage:
    """Model-ready pixels of one image (or its JPEG, left for the device) and its upright
    dimensions."""

    pixels: np.ndarray | JpegBytes
    width_px: int
    height_px: int


def host_pixels(image: PreparedImage) -> np.ndarray:
    """The pixels of an image prepared on the CPU (`ExactDecoder`'s always are)."""
    if isinstance(image.pixels, JpegBytes):
        raise TypeError("a JPEG left for the device has no pixels until the model thread's stage")
    return image.pixels


def prepare_image(data: bytes, limits: ImageLimits, norm: Normalization) -> PreparedImage:
    """Decode, validate and preprocess one encoded image."""
    return ExactDecoder(limits, norm).decode(data)


class Decoder(Protocol):
    """Encoded bytes to model-ready pixels: the decode seam (a GPU decoder plugs in here)."""

    def decode(self, data: bytes) -> PreparedImage:
        """The image's pixels, or `ImageError` with a specific code."""
        ...


@dataclass(frozen=True)
class ExactDecoder:
    """Pillow decode and resize exactly as ModelScope does (`jpeg_draft` trades that for speed)."""

    limits: ImageLimits
    norm: Normalization
    jpeg_draft: bool = False

    def decode(self, data: bytes) -> PreparedImage:
        """Decode, validate, resize and normalise one encoded image."""
        decoded = decode_image(data, self.limits, self.norm.size_px if self.jpeg_draft else 0)
        return PreparedImage(
            to_pixels(decoded.image, self.norm), decoded.width_px, decoded.height_px
        )


def decode_safely(decoder: Decoder, data: bytes) -> PreparedImage | ImageError:
    """Decode one image; any failure, a decoder bug included, is that image's `ImageError`."""
    try:
        return decoder.decode(data)
    except ImageError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a decoder bug must fail one image, not its batch
        log.warning("decoder failed unexpectedly: %r", exc)
        error = ImageError(Code.UNDECODABLE, f"decoder error {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error


def preprocess_many(
    blobs: Sequence[bytes], decoder: Decoder, pool: ThreadPoolExecutor
) -> list[PreparedImage | ImageError]:
    """Decode images in a thread pool; a failure stays in its slot as an `ImageError`."""
    return list(pool.map(lambda data: decode_safely(decoder, data), blobs))
