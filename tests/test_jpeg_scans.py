"""A progressive JPEG costs libjpeg a pass over the whole image per scan: one with thousands of
scans is refused before decoding (`too_many_scans`) on the exact and the device paths, while
normal progressive JPEGs decode as before."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from capworks.schema.errors import Code, ImageError
from capworks.workers.device_preprocess import DevicePreprocessor, JpegPassThrough
from capworks.workers.preprocess import (
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    ExactDecoder,
    ImageLimits,
    JpegBytes,
    Normalization,
    jpeg_scan_refusal,
)

NORM = Normalization(96)
EXACT = ExactDecoder(ImageLimits(), NORM)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG; a scan's end includes its
    entropy-coded data (written independently of the code under test)."""
    out, pos = [], 2
    while data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            found = _NEXT_MARKER.search(data, end)
            assert found is not None
            end = found.start()
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg(size_px: int, seed: int = 0, flat: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size_px, size_px, 3)
    pixels = np.full(shape, 128, np.uint8) if flat else rng.integers(0, 255, shape, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", progressive=True, quality=90)
    return buf.getvalue()


def many_scan_jpeg(scans: int, size_px: int = 512) -> bytes:
    """A flat progressive JPEG whose last scan (with the table before it) is repeated until it
    has `scans` scans: a few dozen bytes a scan, each scan a full decoder pass (libjpeg warns
    about the progression and decodes on)."""
    data = progressive_jpeg(size_px, flat=True)
    segs = segments(data)
    last = max(i for i, (marker, _, _) in enumerate(segs) if marker == 0xDA)
    first = last - 1 if segs[last - 1][0] == 0xC4 else last
    have = sum(marker == 0xDA for marker, _, _ in segs)
    repeated = data[segs[first][1] : segs[last][2]]
    cut = segs[last][2]
    return data[:cut] + repeated * (scans - have) + data[cut:]


def scan_count(data: bytes) -> int:
    return sum(marker == 0xDA for marker, _, _ in segments(data))


def test_a_ten_thousand_scan_jpeg_is_refused_before_decoding_in_a_tenth_of_a_second() -> None:
    data = many_scan_jpeg(10_000)
    assert scan_count(data) == 10_000 and len(data) < ImageLimits().max_bytes
    with Image.open(io.BytesIO(data)) as img:  # its header passes: only the decoder would pay
        assert img.format == "JPEG" and max(img.size) <= ImageLimits().max_px
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        EXACT.decode(data)
    took_s = time.perf_counter() - started
    print(f"10,000-scan JPEG ({len(data)} bytes) refused in {took_s * 1000:.1f} ms")
    assert caught.value.code is Code.TOO_MANY_SCANS
    assert f"more than {MAX_JPEG_SCANS} scans" in caught.value.message
    assert took_s < 0.1


def test_a_jpeg_one_scan_over_the_bound_is_refused_and_one_at_the_bound_decodes() -> None:
    assert jpeg_scan_refusal(many_scan_jpeg(MAX_JPEG_SCANS, size_px=64)) is None
    EXACT.decode(many_scan_jpeg(MAX_JPEG_SCANS, size_px=64))
    with pytest.raises(ImageError) as caught:
        EXACT.decode(many_scan_jpeg(MAX_JPEG_SCANS + 1, size_px=64))
    assert caught.value.code is Code.TOO_MANY_SCANS


@pytest.mark.parametrize("size_px", [16, 333, 1024])
def test_normal_progressive_jpegs_still_decode(size_px: int) -> None:
    data = progressive_jpeg(size_px, seed=size_px)
    assert 2 <= scan_count(data) <= 20
    assert jpeg_scan_refusal(data) is None
    assert EXACT.decode(data).width_px == size_px


def test_a_scan_count_in_a_thumbnail_inside_exif_is_not_counted() -> None:
    """The walk skips segment payloads: scans of a JPEG embedded in APP1 are not the image's."""
    thumb = many_scan_jpeg(MAX_JPEG_SCANS + 50, size_px=16)
    data = progressive_jpeg(64)
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    with_thumb = data[:2] + app1 + data[2:]
    assert jpeg_scan_refusal(with_thumb) is None
    assert EXACT.decode(with_thumb).width_px == 64


def test_the_gpu_decode_stage_refuses_a_many_scan_jpeg_with_the_same_code() -> None:
    data = many_scan_jpeg(10_000)
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        JpegPassThrough(EXACT).decode(data)
    assert caught.value.code is Code.TOO_MANY_SCANS
    assert time.perf_counter() - started < 0.1
    ok = JpegPassThrough(EXACT).decode(progressive_jpeg(64))
    assert isinstance(ok.pixels, JpegBytes)


def test_the_device_stage_never_decodes_a_many_scan_jpeg_on_the_device() -> None:
    pytest.importorskip("torchvision")
    device = DevicePreprocessor(ImageLimits(), NORM, torch.device("cpu"))
    batch = device.prepare_many([many_scan_jpeg(10_000), progressive_jpeg(64)])
    assert batch.index == [1]
    assert batch.errors[0].code is Code.TOO_MANY_SCANS


def test_a_jpeg_of_ten_thousand_comment_segments_is_refused_without_a_slow_walk() -> None:
    """The walk itself is bounded: a file of tiny segments costs at most 10,000 steps."""
    data = progressive_jpeg(64)
    comments = b"\xff\xfe\x00\x02" * (MAX_JPEG_SEGMENTS * 20)
    data = data[:2] + comments + data[2:]
    started = time.perf_counter()
    refusal = jpeg_scan_refusal(data)
    assert refusal == f"more than {MAX_JPEG_SEGMENTS} marker segments"
    assert time.perf_counter() - started < 0.1
