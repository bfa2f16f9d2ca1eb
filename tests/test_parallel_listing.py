"""A bucket crawl listed by concurrent streams (`capworks enqueue s3://... --list-streams N
[--prefixes a/,b/]`) against a real SeaweedFS: discovered parts hold every key once (SeaweedFS
lists `cats/...` before `cats.png`, unlike S3), every key enqueued once in jobs that mix
prefixes, and a run cut off mid-page resumed per part with no key published twice, also by a
run with another number of streams; the same with the streams in listing processes."""

from __future__ import annotations

import base64
import json
import multiprocessing
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from botocore.utils import parse_timestamp
from conftest import s3_client
from pipeline_support import REDIS_URL, Pipeline, own_queue, queued_images
from test_inventory import Crash, CrashingPublisher, producer_model

from capworks.producer.crawl import run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.listing import (
    ListingPlan,
    Part,
    decode_position,
    discover_parts,
    encode_position,
    iter_part,
)
from capworks.schema.db import connect
from capworks.schema.errors import StorageError
from capworks.schema.settings import Settings
from capworks.schema.storage import parse_timestamp_fast
from capworks.schema.uris import S3Location

IDENTITY = ("m", "r", "h")
FOLDERS = ["2024/", "2025/", "cats/", "dogs/", "dogs/old/", "zebra/"]


@pytest.fixture()
def local(tmp_path: Path, s3_endpoint: str) -> Iterator[Pipeline]:
    with own_queue(f"sqlite:///{tmp_path / 'capworks.db'}", tmp_path, s3_endpoint) as p:
        yield p


@pytest.fixture()
def bucket(s3_endpoint: str) -> tuple[str, list[str]]:
    """A bucket of 80 keys: 12 under each folder, and some between and beside the folders."""
    name = f"wide-{uuid.uuid4().hex[:8]}"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    keys = [f"{folder}{n:02d} photo.png" for folder in FOLDERS for n in range(12)]
    keys += ["a.png", "cats.png", "dogs+more.png", "zz top.png", "ünïcödé.png", "mid/x.png"]
    keys += ["2024/nested/deeper/y.png", "zebra/stripes/z.png"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=name, Key=k, Body=k.encode()), keys))  # type: ignore[attr-defined]
    return name, [f"s3://{name}/{k}" for k in keys]


def crawl(p: Pipeline, source: str, plan: ListingPlan, crash_at: int = 0) -> Any:
    publisher = make_publisher(Settings(broker_url=REDIS_URL, queue_name=p.queue, job_images=4))
    return run_crawl(
        source,
        crawl_id="wide",
        db=connect(p.db_url),
        publisher=CrashingPublisher(publisher, crash_at) if crash_at else publisher,
        s3_client=s3_client(p.s3_endpoint),
        identity=IDENTITY,
        job_images=4,
        listing=plan,
        page_size=16,
    )


def job_folders(p: Pipeline) -> list[set[str]]:
    """The first path component of the keys of each queued job."""
    jobs = []
    for raw in p.redis().lrange(p.queue, 0, -1):
        [[body], *_] = json.loads(base64.b64decode(json.loads(raw)["body"]))
        jobs.append({uri.split("/")[3] for uri, *_ in body["images"]})
    return jobs


def test_discovered_parts_hold_every_key_once_whatever_order_the_server_lists_in(
    bucket: tuple[str, list[str]], s3_endpoint: str
) -> None:
    name, uris = bucket
    s3 = s3_client(s3_endpoint)
    parts = discover_parts(s3, S3Location(name, ""), want=8, threads=4)
    assert Part("", flat=True) in parts and Part("dogs/", flat=True) in parts
    assert Part("dogs/old/") in parts and Part("cats/") in parts
    listed = [ref.uri for part in parts for chunk in iter_part(name, s3, part) for ref in chunk]
    assert sorted(listed) == sorted(uris)
    assert decode_position(encode_position(parts)) == parts


def test_several_streams_enqueue_every_key_once_in_jobs_that_mix_folders(
    local: Pipeline, bucket: tuple[str, list[str]]
) -> None:
    name, uris = bucket
    stats = crawl(local, f"s3://{name}/", ListingPlan(streams=4))
    queued = Counter(queued_images(local))
    assert set(queued) == set(uris) and set(queued.values()) == {1}
    assert (stats.listed, stats.enqueued) == (len(uris), len(uris))
    mixed = [folders for folders in job_folders(local) if len(folders) > 1]
    assert len(mixed) >= len(job_folders(local)) // 2, job_folders(local)


@pytest.mark.parametrize("processes", [1, 2], ids=["threads", "listing processes"])
def test_a_cut_off_parallel_crawl_resumes_per_part_and_publishes_each_key_once(
    local: Pipeline, bucket: tuple[str, list[str]], processes: int
) -> None:
    name, uris = bucket
    client = partial(s3_client, local.s3_endpoint)
    first, then = (
        (ListingPlan(streams=3), ListingPlan(streams=8))  # more streams, same ranges
        if processes == 1
        else (ListingPlan(streams=4, processes=processes, client=client),) * 2
    )
    with pytest.raises(Crash):  # dies before its 7th job: the middle of the second page
        crawl(local, f"s3://{name}/", first, crash_at=7)
    assert multiprocessing.active_children() == []  # listing processes stopped with it
    assert 0 < len(queued_images(local)) < len(uris)

    stats = crawl(local, f"s3://{name}/", then)

    queued = Counter(queued_images(local))
    assert set(queued) == set(uris) and set(queued.values()) == {1}
    assert stats.enqueued == len(uris) and stats.resumed_from.startswith('{"parts"')
    mixed = [folders for folders in job_folders(local) if len(folders) > 1]
    assert len(mixed) >= len(job_folders(local)) // 2, job_folders(local)


def test_given_prefixes_are_listed_by_several_streams_and_only_their_keys_enqueued(
    local: Pipeline, bucket: tuple[str, list[str]], tmp_path: Path
) -> None:
    name, uris = bucket
    model = producer_model(tmp_path / "model")
    result = local.cli(
        "enqueue", f"s3://{name}/", "--model", str(model), "--no-progress",
        "--list-streams", "2", "--prefixes", "cats/,dogs/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    queued = Counter(queued_images(local))
    wanted = [uri for uri in uris if uri.split("/")[3] in ("cats", "dogs")]
    assert set(queued) == set(wanted) and set(queued.values()) == {1}
    assert f"listed {len(wanted)}" in result.stdout


def test_listing_times_parse_as_botocore_parses_them_iso_and_http_dates_alike() -> None:
    for text in ("2026-12-05T17:00:01.250Z", "Sat, 05 Dec 2026 17:00:01 GMT", "1764954001"):
        assert parse_timestamp_fast(text) == parse_timestamp(text), text


def test_a_resumed_parallel_crawl_also_lists_folders_made_since_it_began_and_no_key_twice(
    local: Pipeline, bucket: tuple[str, list[str]], s3_endpoint: str
) -> None:
    name, uris = bucket
    with pytest.raises(Crash):  # dies before its 7th job: the middle of the second page
        crawl(local, f"s3://{name}/", ListingPlan(streams=3), crash_at=7)
    s3 = s3_client(s3_endpoint)
    added = ["aaa/first.png", "new/one.png", "new/two/three.png", "zzz/last.png"]
    for key in added:
        s3.put_object(Bucket=name, Key=key, Body=b"x")  # type: ignore[attr-defined]

    stats = crawl(local, f"s3://{name}/", ListingPlan(streams=3))

    queued = Counter(queued_images(local))
    assert set(queued) == set(uris) | {f"s3://{name}/{key}" for key in added}
    assert set(queued.values()) == {1}
    assert stats.enqueued == len(uris) + len(added)


def test_a_listing_process_that_cannot_list_fails_the_crawl_with_its_reason(
    local: Pipeline, bucket: tuple[str, list[str]]
) -> None:
    name, _ = bucket
    nothing_listens = partial(s3_client, "http://127.0.0.1:9")  # refused on loopback
    plan = ListingPlan(streams=2, prefixes=("cats/", "dogs/"), processes=2, client=nothing_listens)
    with pytest.raises(StorageError, match=f"cannot list s3://{name}/(cats|dogs)/"):
        crawl(local, f"s3://{name}/", plan)
    assert multiprocessing.active_children() == []
    assert queued_images(local) == []


def test_enqueue_lists_with_processes_from_the_command_line(
    local: Pipeline, bucket: tuple[str, list[str]], tmp_path: Path
) -> None:
    name, uris = bucket
    model = producer_model(tmp_path / "model")
    enqueue = ["enqueue", f"s3://{name}/", "--model", str(model), "--no-progress"]
    refused = local.cli(*enqueue, "--list-streams", "2", "--list-processes", "3")
    assert refused.returncode != 0 and queued_images(local) == []
    assert "--list-processes cannot be more than --list-streams" in refused.stderr
    assert "Traceback" not in refused.stderr

    result = local.cli(*enqueue, "--list-streams", "4", "--list-processes", "2")

    assert result.returncode == 0, result.stderr
    queued = Counter(queued_images(local))
    assert set(queued) == set(uris) and set(queued.values()) == {1}
