"""Every kind of bad input through the distributed pipeline: one bucket of all the cases on a
real S3 server, one `capworks enqueue`, one real Celery worker on the shapes model, plus
hypothesis-generated malformed job messages on the same queue. Each case ends as the table says
(the same table `capworks caption` is checked against) and the worker process never dies."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from conftest import s3_client
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from pipeline_support import Pipeline, count_rows, wait_until
from test_messages import bodies, scalars

from badinput.cases import CASES
from badinput.support import (
    bad_message_reasons,
    mismatches,
    outcome_table,
    read_outcomes,
    unprivileged,
)
from capworks.schema.jobs import Job, MalformedJob, escaped, parse_message
from capworks.schema.queue import CAPTION_TASK, make_celery
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef, file_uri, s3_uri

pytestmark = pytest.mark.slow
BUCKET = "badinput"
MALFORMED_MESSAGES = 30
# Well formed, but no S3 can have the bucket: a bad URI at once, not retried as unavailable.
BAD_BUCKET_URI = "s3://bad bucket!/photo.jpg"


def malformed_messages(count: int) -> list[tuple[list[Any], dict[str, Any], str]]:
    """`count` task messages drawn by hypothesis (the strategies of test_messages.py) that
    validation refuses as a whole, as the worker receives them (through JSON), with the reason."""
    found: list[tuple[list[Any], dict[str, Any], str]] = []

    @settings(max_examples=count * 4, database=None, derandomize=True, phases=[Phase.generate])
    @given(
        args=st.lists(st.one_of(bodies, scalars), max_size=3),
        kwargs=st.dictionaries(
            st.sampled_from(["body", "attempt", "other"]), st.one_of(bodies, scalars)
        ),
    )
    def collect(args: list[Any], kwargs: dict[str, Any]) -> None:
        wire_args, wire_kwargs = json.loads(json.dumps([args, kwargs]))
        try:
            parse_message(tuple(wire_args), wire_kwargs)
        except MalformedJob as exc:
            if len(found) < count:
                found.append((wire_args, wire_kwargs, escaped(exc.message)))

    collect()
    assert len(found) == count, f"hypothesis drew only {len(found)} malformed messages"
    return found


def fill_bucket(p: Pipeline, blobs: dict[str, bytes]) -> dict[str, str]:
    """Every stored case as an object under `cases/`, the unreadable one as a local file of mode
    000 (the S3 server here grants every request); returns kind -> URI."""
    s3 = s3_client(p.s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    uri_of = {}
    for case in CASES:
        if case.placement == "denied":
            path = p.tmp / "unreadable" / case.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blobs[case.kind])
            path.chmod(0)
            uri_of[case.kind] = file_uri(path)
            continue
        key = f"cases/{case.filename}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=blobs[case.kind])  # type: ignore[attr-defined]
        uri_of[case.kind] = s3_uri(BUCKET, key)
    return uri_of


def test_every_bad_input_kind_ends_as_the_table_says_in_one_worker_run(
    pipeline: Pipeline,
    case_blobs: dict[str, bytes],
    same_bytes_captions: dict[str, str],
) -> None:
    p = pipeline
    started = time.monotonic()
    uri_of = fill_bucket(p, case_blobs)
    listed = p.cli("enqueue", f"s3://{BUCKET}/cases/", "--no-progress")
    assert listed.returncode == 0, listed.stderr
    in_bucket = sum(c.placement != "denied" for c in CASES)
    assert f"enqueued {in_bucket}" in listed.stdout, listed.stdout
    s3 = s3_client(p.s3_endpoint)
    for case in CASES:  # listed and enqueued; gone before any worker fetches it
        if case.placement == "deleted":
            s3.delete_object(Bucket=BUCKET, Key=f"cases/{case.filename}")  # type: ignore[attr-defined]
    local = p.cli("enqueue", str(p.tmp / "unreadable"), "--no-progress")
    assert local.returncode == 0 and "enqueued 1" in local.stdout, local.stdout + local.stderr
    messages = malformed_messages(MALFORMED_MESSAGES)
    app = make_celery(Settings(broker_url=p.env["CAPWORKS_BROKER_URL"], queue_name=p.queue))
    for args, kwargs, _ in messages:
        app.send_task(CAPTION_TASK, args=args, kwargs=kwargs, queue=p.queue)
    unfetchable = Job.new([ImageRef(BAD_BUCKET_URI, bucket="bad bucket!", key="photo.jpg")], "x")
    app.send_task(CAPTION_TASK, args=[unfetchable.to_wire()], queue=p.queue)

    worker = p.start_worker(prefix=unprivileged())
    wait_until(
        lambda: (
            sum(count_rows(p.db_url)[t] for t in ("captions", "failures")) >= len(CASES) + 1
            and len(bad_message_reasons(p.db_url)) >= len(messages)
            and p.queue_length() == 0
        ),
        300,
        f"{len(CASES) + 1} outcomes, {len(messages)} bad messages and an empty queue",
        lambda: p.log_text()[-4000:],
    )
    took_s = time.monotonic() - started
    seen = read_outcomes(p.db_url)
    print(f"worker run over {len(CASES)} kinds and {len(messages)} messages: {took_s:.1f} s\n")
    print(outcome_table(uri_of, seen))
    assert worker.poll() is None, p.log_text()[-4000:]  # the worker is alive: it never died
    assert mismatches(uri_of, seen, same_bytes_captions) == []
    assert set(seen) == {*uri_of.values(), BAD_BUCKET_URI}
    assert seen[BAD_BUCKET_URI].code == "bad_uri", seen[BAD_BUCKET_URI]
    assert sorted(bad_message_reasons(p.db_url)) == sorted(reason for *_, reason in messages)
    log = p.log_text()
    assert "Traceback" not in log and "WorkerLostError" not in log, log[-4000:]
