"""The bad-input table: every kind of awkward input, made by code, and what it must end as.

Both modes read this one table: `test_caption_cli.py` writes every case into one folder and runs
`capworks caption` over it once; `test_worker.py` puts every case in one bucket, enqueues it
once and lets one real worker caption it. An expected outcome is "caption" or the `Code` of the
dead letter a user would want to see.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageCms

from capworks.checkpoints.shapes_world import Scene, render_scene
from capworks.schema.errors import Code

CAPTION = "caption"
MAX_BYTES = 10 * 1024 * 1024  # the default `ImageLimits.max_bytes`
MAX_PX = 3000  # the default `ImageLimits.max_px`
Placement = Literal["stored", "deleted", "denied"]


@dataclass(frozen=True)
class Case:
    """One kind of bad input: its bytes, its name, where it lies, and what it must end as.

    `truth` is the shapes caption a "caption" case must get (None where the picture is not a
    shapes scene); `upright_px` the (width, height) the images table must record, if checked.
    `placement`: "deleted" is removed after listing and before the fetch; "denied" cannot be read.
    """

    kind: str
    make: Callable[[], bytes]
    expect: str
    suffix: str = ".png"
    name: str | None = None
    truth: str | None = None
    upright_px: tuple[int, int] | None = None
    placement: Placement = "stored"
    notes: str = field(default="", compare=False)

    @property
    def filename(self) -> str:
        """The case's relative file name (S3 key under the cases' prefix)."""
        return self.name if self.name is not None else f"{self.kind}{self.suffix}"


SCENE = Scene("red", "blue")
OTHER = Scene("yellow", "green")


def scene(s: Scene = SCENE, seed: int = 7) -> Image.Image:
    """A 128 px shapes picture the checkpoint captions as `s.caption`."""
    return render_scene(s, random.Random(seed))


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """`img` saved in `fmt` with Pillow's writer."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def truncated(fmt: str) -> Callable[[], bytes]:
    """A shapes picture in `fmt`, cut off after 60% of its bytes (headers intact)."""

    def make() -> bytes:
        data = encode(scene(), fmt)
        return data[: len(data) * 6 // 10]

    return make


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow writes no 16-bit RGB and no lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    """A 2 KB PNG whose header declares 40000 x 30000 px (1.2 gigapixels)."""
    width, height = 40_000, 30_000
    rows = b"\x00" + b"\x00" * (width * 3)  # one row of data; the rest is never reached
    return raw_png(width, height, 8, 2, rows)


def jpeg_bomb() -> bytes:
    """A real 16 x 16 JPEG whose frame header is rewritten to declare 65000 x 65000 px."""
    data = bytearray(encode(scene().resize((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_000, 65_000)
    return bytes(data)


def wide_strip() -> bytes:
    """A valid 200000 x 3 px PNG (600,000 px, a few KB)."""
    return encode(Image.new("RGB", (200_000, 3), (30, 60, 220)), "PNG")


def png16_rgb() -> bytes:
    """The shapes picture as a 16-bit-per-channel RGB PNG."""
    px = np.asarray(scene(), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + px[y].astype(">u2").tobytes() for y in range(px.shape[0]))
    return raw_png(px.shape[1], px.shape[0], 16, 2, rows)


def png16_grey() -> bytes:
    """A 16-bit greyscale PNG (mode I;16): a black square on a white ground."""
    px = np.full((128, 128), 62_500, dtype=np.uint16)
    px[30:95, 40:105] = 3_500
    rows = b"".join(b"\x00" + px[y].astype(">u2").tobytes() for y in range(px.shape[0]))
    return raw_png(128, 128, 16, 0, rows)


def palette_transparent() -> bytes:
    """The shapes picture as a palette PNG with a transparent colour (tRNS)."""
    img = scene().quantize(16)
    return encode(img, "PNG", transparency=0)


def animated(fmt: str) -> Callable[[], bytes]:
    """Two frames, the first the red-on-blue scene, the second another scene."""

    def make() -> bytes:
        first, second = scene(), scene(OTHER, seed=8)
        return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)

    return make


def exif_rotated(orientation: int) -> Callable[[], bytes]:
    """A 128 x 64 px JPEG with EXIF Orientation `orientation` (2..8)."""

    def make() -> bytes:
        img = scene().resize((128, 64))
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode(img, "JPEG", exif=exif.tobytes(), quality=95)

    return make


def corrupt_exif() -> bytes:
    """A JPEG whose APP1 Exif segment holds a TIFF header pointing past its end."""
    data = encode(scene(), "JPEG", quality=95)
    tiff = b"II*\x00" + struct.pack("<I", 0xFFFF) + b"\x07\x00\x12\x01\x03" + b"\xee" * 20
    app1 = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return data[:2] + segment + data[2:]


def with_icc(broken: bool) -> Callable[[], bytes]:
    """A JPEG with an embedded ICC profile: a real sRGB one, or 600 bytes of noise."""

    def make() -> bytes:
        if broken:
            profile = bytes(random.Random(3).getrandbits(8) for _ in range(600))
        else:
            profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        return encode(scene(), "JPEG", icc_profile=profile, quality=95)

    return make


def cmyk_jpeg() -> bytes:
    """The shapes picture as an Adobe CMYK JPEG."""
    return encode(scene().convert("CMYK"), "JPEG", quality=95)


def ycck_jpeg() -> bytes:
    """The shapes picture as an Adobe YCCK JPEG (transform 2), as Photoshop writes CMYK.

    Pillow writes plain CMYK only, so the YCCK components are computed here (JFIF YCbCr of the
    inverted C, M, Y; K kept) and the Adobe marker's transform byte set to 2."""
    cmyk = np.asarray(scene().convert("CMYK"), dtype=np.float64)
    r, g, b = (255 - cmyk[..., i] for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    planes = np.stack([y, cb, cr, cmyk[..., 3]], axis=-1)
    img = Image.fromarray(np.clip(planes.round(), 0, 255).astype(np.uint8), "CMYK")
    data = bytearray(encode(img, "JPEG", quality=95))
    adobe = data.index(b"Adobe")
    data[adobe + 11] = 2  # "Adobe", version (2), flags0 (2), flags1 (2), transform
    return bytes(data)


def zip_file() -> bytes:
    """A ZIP archive holding one PNG."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inside.png", encode(scene(), "PNG"))
    return buf.getvalue()


def pdf_file() -> bytes:
    """A one-page PDF (Pillow's writer: the picture on a page)."""
    return encode(scene(), "PDF")


def noise_png(min_bytes: int) -> bytes:
    """A valid RGB PNG of noise (incompressible), at least `min_bytes` long, under 3000 px."""
    side = int((min_bytes / 3) ** 0.5) + 16
    pixels = np.random.default_rng(5).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", compress_level=1)


def scene_png() -> bytes:
    """The plain red-on-blue shapes picture as PNG."""
    return encode(scene(), "PNG")


def long_name() -> str:
    """A 1,000-byte relative name: folders of 200 bytes (a file name holds at most 255)."""
    parts = ["d" * 199 + str(i) for i in range(4)]
    stem = "x" * (1000 - sum(len(p) + 1 for p in parts) - len(".png"))
    name = "/".join([*parts, stem + ".png"])
    assert len(name.encode()) == 1000
    return name


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


T = SCENE.caption
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
    b'width="128" height="128"><rect width="128" height="128" fill="#1e3cdc"/></svg>\n'
)

CASES: tuple[Case, ...] = (
    Case("zero_bytes", _const(b""), Code.EMPTY.value, ".jpg"),
    Case("truncated_jpeg", truncated("JPEG"), Code.TRUNCATED.value, ".jpg"),
    Case("truncated_png", truncated("PNG"), Code.TRUNCATED.value, ".png"),
    Case("truncated_webp", truncated("WEBP"), Code.TRUNCATED.value, ".webp"),
    Case("truncated_gif", truncated("GIF"), Code.TRUNCATED.value, ".gif"),
    Case("png_named_jpg", scene_png, CAPTION, ".jpg", truth=T),
    Case("jpeg_named_webp", lambda: encode(scene(), "JPEG"), CAPTION, ".webp", truth=T),
    Case("html_named_jpg", _const(HTML), Code.UNDECODABLE.value, ".jpg"),
    Case("svg_named_jpg", _const(SVG), Code.UNSUPPORTED_FORMAT.value, ".jpg"),
    Case("pdf_named_jpg", pdf_file, Code.UNSUPPORTED_FORMAT.value, ".jpg"),
    Case("zip_named_jpg", zip_file, Code.UNDECODABLE.value, ".jpg"),
    Case("text_named_jpg", _const(b"just some words\n" * 20), Code.UNDECODABLE.value, ".jpg"),
    Case("bomb_png_1_2_gigapixels", png_bomb, Code.TOO_LARGE_PIXELS.value),
    Case("bomb_jpeg_4_2_gigapixels", jpeg_bomb, Code.TOO_LARGE_PIXELS.value, ".jpg"),
    Case("wide_200000x3", wide_strip, Code.TOO_LARGE_PIXELS.value),
    Case("one_by_one", lambda: encode(Image.new("RGB", (1, 1), (220, 30, 30)), "PNG"), CAPTION),
    Case("aspect_3000x1", lambda: encode(scene().resize((3000, 1)), "PNG"), CAPTION),
    Case("aspect_1x3000", lambda: encode(scene().resize((1, 3000)), "PNG"), CAPTION),
    Case("cmyk_jpeg", cmyk_jpeg, CAPTION, ".jpg", truth=T),
    Case("ycck_jpeg", ycck_jpeg, CAPTION, ".jpg", truth=T),
    Case("png_16bit_rgb", png16_rgb, CAPTION, truth=T),
    Case("png_16bit_grey", png16_grey, CAPTION, truth=Scene("black", "white").caption),
    Case("png_1bit", lambda: encode(scene().convert("1"), "PNG"), CAPTION),
    Case("png_la", lambda: encode(scene().convert("LA"), "PNG"), CAPTION),
    Case("png_palette_transparency", palette_transparent, CAPTION, truth=T),
    Case("animated_gif", animated("GIF"), CAPTION, ".gif", truth=T),
    Case("animated_webp", animated("WEBP"), CAPTION, ".webp", truth=T),
    *(
        Case(
            f"exif_orientation_{o}",
            exif_rotated(o),
            CAPTION,
            ".jpg",
            truth=T,
            upright_px=(64, 128) if o >= 5 else (128, 64),
        )
        for o in range(2, 9)
    ),
    Case("corrupt_exif", corrupt_exif, CAPTION, ".jpg", truth=T),
    Case("icc_srgb", with_icc(broken=False), CAPTION, ".jpg", truth=T),
    Case("icc_garbage", with_icc(broken=True), CAPTION, ".jpg", truth=T),
    Case(
        "at_pixel_limit_3000x3000",
        lambda: encode(scene().resize((MAX_PX, MAX_PX)), "PNG"),
        CAPTION,
        truth=T,
    ),
    Case(
        "huge_8000x8000_under_byte_limit",
        lambda: encode(Image.new("RGB", (8000, 8000), (30, 60, 220)), "PNG"),
        Code.TOO_LARGE_PIXELS.value,
    ),
    Case("over_byte_limit", lambda: noise_png(MAX_BYTES + 1), Code.TOO_LARGE_BYTES.value),
    Case("name_space", scene_png, CAPTION, name="a photo with spaces.png", truth=T),
    Case("name_plus", scene_png, CAPTION, name="a+b+c.png", truth=T),
    Case("name_percent", scene_png, CAPTION, name="100%25 %zz %41.png", truth=T),
    Case("name_unicode", scene_png, CAPTION, name="ünïcödé 写真 🖼.png", truth=T),
    Case("name_1000_bytes", scene_png, CAPTION, name=long_name(), truth=T),
    Case("deleted_after_listing", scene_png, Code.NOT_FOUND.value, placement="deleted"),
    Case("access_denied", scene_png, Code.ACCESS_DENIED.value, placement="denied"),
)
