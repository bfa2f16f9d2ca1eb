"""The caption belongs to the bytes that were read: an object overwritten between listing and
fetch is captioned and stored under its new ETag, a deleted one is `not_found` (real SeaweedFS
S3, real tiny-random engine, the real result writer)."""

from __future__ import annotations

from pathlib import Path

from conftest import png_bytes, s3_client
from sqlalchemy import create_engine, select
from test_image_path import image_path

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.sources import iter_s3
from capworks.schema.checkpoint import read_config
from capworks.schema.db import connect
from capworks.schema.errors import Code
from capworks.schema.settings import Settings
from capworks.schema.tables import Image
from capworks.workers.engine import OfaEngine
from capworks.workers.fetch import Fetched, StoreFetcher
from capworks.workers.persist import ResultWriter


def test_an_object_overwritten_after_listing_is_stored_under_its_new_etag(
    s3_endpoint: str,
    tiny_engine: OfaEngine,
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="versions")
    first, second = (png_bytes(img) for img, _ in sample_scenes(2, seed=91))
    s3.put_object(Bucket="versions", Key="changed.png", Body=first)
    s3.put_object(Bucket="versions", Key="kept.png", Body=first)
    s3.put_object(Bucket="versions", Key="deleted.png", Body=first)
    listed = {r.key: r for r in iter_s3("s3://versions/", s3)}
    s3.put_object(Bucket="versions", Key="changed.png", Body=second)  # overwritten
    s3.delete_object(Bucket="versions", Key="deleted.png")
    new_etag = s3.head_object(Bucket="versions", Key="changed.png")["ETag"].strip('"')
    assert new_etag != listed["changed.png"].etag
    fetcher = StoreFetcher.from_settings(Settings(), s3)  # the S3 endpoint is never guarded
    got = fetcher.fetch(listed["changed.png"])
    assert isinstance(got, Fetched) and got.data == second
    assert (got.ref.etag, got.ref.size_bytes) == (new_etag, len(second))
    assert fetcher.fetch(listed["kept.png"]) == first
    path = image_path(fetcher, tiny_engine, tiny_engine, room=4)  # type: ignore[arg-type]
    try:
        outcomes = path.caption([listed[k] for k in ("changed.png", "kept.png", "deleted.png")])
    finally:
        path.close()
    assert [o.error.code if o.error else None for o in outcomes] == [None, None, Code.NOT_FOUND]
    db_url = f"sqlite:///{tmp_path / 'versions.db'}"
    ResultWriter(connect(db_url), read_config(tiny_dir, "tiny-random")).save(outcomes)
    with create_engine(db_url).connect() as conn:
        stored = dict(conn.execute(select(Image.key, Image.etag)).all())
    assert stored == {
        "changed.png": new_etag,
        "kept.png": listed["kept.png"].etag,
        "deleted.png": listed["deleted.png"].etag,
    }
