"""CAPWORKS_PREPROCESS=gpu through the one image path, with device="cpu" (the code a GPU runs):
`capworks caption` and a worker's job decode their JPEGs in the model thread, and caption them
as the exact path does on nearly every image; a PNG goes the exact way, a broken JPEG is
dead-lettered with the exact path's code and the rest of its batch is captioned. Without a
torchvision built for this torch, `capworks caption` and a real worker refuse to start in one
line."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import png_bytes, run_cli
from PIL import ExifTags, Image
from sqlalchemy import create_engine, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.sources import iter_refs
from capworks.schema.jobs import Job
from capworks.schema.settings import Settings
from capworks.schema.tables import Failure
from capworks.schema.tables import Image as ImageRow
from capworks.workers.engine import CaptionedImage
from capworks.workers.job import run_job
from capworks.workers.runtime import Runtime

SEED = 71
JPEGS = 16
# Device decode + float resize differ from Pillow by a grey level or two; measured 16 of 16 here.
AGREE_AT_LEAST = 14
CAMERA_SIZES = [(640, 480), (480, 640), (800, 600), (512, 512)]


def torchvision_usable() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


needs_torchvision = pytest.mark.skipif(
    not torchvision_usable(), reason="no torchvision built for this torch"
)


def jpeg(img: Image.Image, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **params)
    return buf.getvalue()


def write_images(root: Path) -> dict[str, bytes]:
    """Camera-sized JPEGs of shapes scenes (the first on its side by EXIF), a PNG, a JPEG cut
    short and one with no image data; returns file name -> bytes."""
    blobs: dict[str, bytes] = {}
    scenes = sample_scenes(JPEGS + 1, SEED)
    for i, (img, _) in enumerate(scenes[:JPEGS]):
        big = img.resize(CAMERA_SIZES[i % len(CAMERA_SIZES)], Image.Resampling.BILINEAR)
        if i == 0:
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = 6
            blobs[f"scene {i:02d}.jpg"] = jpeg(big, exif=exif.tobytes())
        else:
            blobs[f"scene {i:02d}.jpg"] = jpeg(big)
    blobs["scene.png"] = png_bytes(scenes[JPEGS][0])
    whole = blobs["scene 01.jpg"]
    blobs["cut short.jpg"] = whole[: len(whole) // 2]
    blobs["no scan.jpg"] = whole[: whole.index(b"\xff\xda")] + b"\xff\xd9"
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    return blobs


def exact_results(engine: Any, blobs: dict[str, bytes]) -> dict[str, Any]:
    """File name -> (caption, width, height) or error code on the exact path (the raw engine)."""
    got = engine.caption_images(list(blobs.values()))
    return {
        name: (r.caption.text, r.width_px, r.height_px)
        if isinstance(r, CaptionedImage)
        else r.code.value
        for name, r in zip(blobs, got, strict=True)
    }


def rows(db_url: str) -> dict[str, Any]:
    """File name -> (caption, width, height) or failure code, as the database holds them."""
    from capworks.schema.tables import Caption

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            captioned = conn.execute(
                select(ImageRow.uri, Caption.text, ImageRow.width_px, ImageRow.height_px).join(
                    Caption
                )
            ).all()
            failed = conn.execute(select(ImageRow.uri, Failure.code).join(Failure)).all()
    finally:
        engine.dispose()
    out: dict[str, Any] = {Path(u).name: (t, w, h) for u, t, w, h in captioned}
    out.update({Path(u).name: code for u, code in failed})
    return out


def assert_like_the_exact_path(got: dict[str, Any], exact: dict[str, Any]) -> int:
    """Bad images fail with the exact path's codes, the PNG gets the exact caption, and JPEG
    captions agree on at least AGREE_AT_LEAST; returns how many JPEG captions agree."""
    assert set(got) == set(exact)
    assert (got["cut short.jpg"], got["no scan.jpg"]) == ("truncated", "undecodable")
    assert (exact["cut short.jpg"], exact["no scan.jpg"]) == ("truncated", "undecodable")
    assert got["scene.png"] == exact["scene.png"]
    jpegs = [n for n in exact if n.startswith("scene ")]
    assert [got[n][1:] for n in jpegs] == [exact[n][1:] for n in jpegs]  # upright sizes
    assert exact["scene 00.jpg"][1:] == (480, 640)  # on its side by EXIF
    agree = sum(got[n][0] == exact[n][0] for n in jpegs)
    assert agree >= AGREE_AT_LEAST, f"{agree} of {len(jpegs)} JPEG captions agree"
    return agree


@needs_torchvision
def test_caption_with_gpu_preprocessing_captions_like_the_exact_path_and_fails_bad_images_alone(
    tmp_path: Path, shapes_engine: Any
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    blobs = write_images(root)
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    result = run_cli(
        "-v",
        "caption",
        str(root),
        "--model",
        "shapes",
        "--db",
        url,
        "--device",
        "cpu",
        "--json",
        "--no-progress",
        env={"CAPWORKS_PREPROCESS": "gpu"},
    )
    assert result.returncode == 3, result.stderr[-3000:]  # two broken JPEGs fail
    assert "JPEGs decoded on cpu" in result.stderr  # the model thread's device decode ran
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(d.get("error", "") for d in printed).count("") == JPEGS + 1
    agree = assert_like_the_exact_path(rows(url), exact_results(shapes_engine, blobs))
    print(f"capworks caption, gpu preprocessing on cpu: {agree} of {JPEGS} JPEG captions agree")


@needs_torchvision
def test_a_job_with_gpu_preprocessing_runs_through_the_worker_runtime(
    tmp_path: Path, shapes_dir: Path, shapes_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    redis_url = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"
    try:
        redis.Redis.from_url(redis_url).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unavailable: {exc}")
    root = tmp_path / "images"
    root.mkdir()
    blobs = write_images(root)
    db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    settings = Settings(
        model="shapes",
        cache_dir=shapes_dir.parent.parent,
        device="cpu",
        preprocess="gpu",
        database_url=db_url,
        broker_url=redis_url,
        file_roots=(root,),
        batch_size=8,
    )
    caplog.set_level(logging.INFO, logger="capworks.workers.device_preprocess")
    rt = Runtime.build(settings)
    try:
        job = Job.new(list(iter_refs([str(root)], None)), None, job_id=uuid.uuid4().hex)
        result = run_job(job, rt)
    finally:
        rt.close()
    decoded_on_device = [r.getMessage() for r in caplog.records if "decoded on cpu" in r.message]
    assert decoded_on_device, "the model thread decoded no JPEG on the device"
    assert (result.captioned, result.dead_lettered, result.transient) == (JPEGS + 1, 2, ())
    agree = assert_like_the_exact_path(rows(db_url), exact_results(shapes_engine, blobs))
    print(f"worker job, gpu preprocessing on cpu: {agree} of {JPEGS} JPEG captions agree")


@pytest.mark.skipif(torchvision_usable(), reason="torchvision works with this torch")
def test_caption_with_gpu_preprocessing_and_no_torchvision_refuses_in_one_line(
    tmp_path: Path, shapes_dir: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(sample_scenes(1, SEED)[0][0]))
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    result = run_cli(
        "caption",
        str(tmp_path / "a.png"),
        "--model",
        "shapes",
        "--db",
        url,
        "--device",
        "cpu",
        env={"CAPWORKS_PREPROCESS": "gpu"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("capworks: error: CAPWORKS_PREPROCESS=gpu needs torchvision")


@pytest.mark.skipif(torchvision_usable(), reason="torchvision works with this torch")
def test_a_worker_with_gpu_preprocessing_and_no_torchvision_refuses_to_start(
    tmp_path: Path, shapes_dir: Path
) -> None:
    from pipeline_support import own_queue

    with own_queue(f"sqlite:///{tmp_path / 'refused.db'}", tmp_path) as p:
        p.extra_env["CAPWORKS_PREPROCESS"] = "gpu"
        worker = p.start_worker("no-torchvision")
        assert worker.wait(timeout=180) != 0
        log_text = p.log_text("no-torchvision")
    refusals = [line for line in log_text.splitlines() if "cannot start the worker" in line]
    assert len(refusals) == 1, log_text[-3000:]
    assert "CAPWORKS_PREPROCESS=gpu needs torchvision built for torch" in refusals[0]
    assert "model thread runs" not in log_text  # refused before the model began to load
