"""Whatever a task message holds, validation ends in a job or a `MalformedJob` with a reason,
and every image of a job it accepts can be stored; job ids are never reused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capworks.schema.errors import Code
from capworks.schema.jobs import (
    MAX_JOB_ID_CHARS,
    MAX_URI_CHARS,
    Job,
    MalformedJob,
    derived_job_id,
    parse_message,
    unstorable,
)
from capworks.schema.uris import ImageRef

# Text as JSON can carry it: any code point, lone surrogates and NUL included.
any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
uris = st.one_of(
    any_text,
    st.builds(lambda b, k: f"s3://{b}/{k}", any_text, any_text),
    st.sampled_from(["s3:///k", "s3://", "s3://b/", "s3://b", "http://h/x.jpg", "/a/b.png"]),
    st.just("s3://b/" + "k" * 3000),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), any_text)
entries = st.one_of(
    st.lists(st.one_of(uris, scalars), max_size=5),
    st.tuples(uris, st.one_of(st.none(), any_text), scalars, st.one_of(st.none(), any_text)).map(
        list
    ),
    scalars,
    st.dictionaries(any_text, scalars, max_size=3),
)
bodies = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), scalars),
            "id": st.one_of(any_text, scalars, st.just("j" * 200)),
            "images": st.one_of(st.lists(entries, max_size=6), scalars),
        },
        optional={"crawl": st.one_of(any_text, scalars), "uploaded": scalars},
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    args=st.lists(st.one_of(bodies, scalars), max_size=3),
    kwargs=st.dictionaries(
        st.sampled_from(["body", "attempt", "other"]), st.one_of(bodies, scalars)
    ),
)
def test_any_message_ends_as_a_job_of_storable_images_or_a_reason(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    try:
        received = parse_message(tuple(args), kwargs)
    except MalformedJob as exc:
        assert exc.code is Code.MALFORMED_MESSAGE and exc.message
        return
    job = received.job
    assert 1 <= received.attempt <= 10_000
    assert len(job.job_id) <= MAX_JOB_ID_CHARS and unstorable(job.job_id) is None
    assert job.images
    assert job.upload_time_s is None or 0 <= job.upload_time_s < 2**63
    for ref in job.images:
        assert len(ref.uri) <= MAX_URI_CHARS and unstorable(ref.uri) is None
        for text in (ref.etag, ref.version_id, ref.bucket, ref.key):
            assert text is None or (len(text) <= 1024 and unstorable(text) is None)
        if ref.uri.startswith("s3://"):
            assert ref.bucket and ref.key
    for bad in received.rejected:
        assert bad.reason


def _body(*images: list[Any], job_id: str = "j1") -> dict[str, Any]:
    return {"v": 1, "id": job_id, "images": list(images)}


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (["s3:///k", None, None, None], "no bucket"),
        (["s3://b/", None, None, None], "names no object"),
        (["s3://b/" + "k" * 2100, None, None, None], "at most 2048"),
        (["/photos/caf\udce9.png", None, None, None], "not valid UTF-8"),
        (["/photos/a\x00b.png", None, None, None], "NUL"),
        (["s3://b/k", "e" * 300, None, None], "etag is 300 characters"),
        (["s3://b/k", None, 2**64, None], "not a byte count"),
    ],
)
def test_an_image_the_database_cannot_store_is_left_out_and_the_rest_kept(
    entry: list[Any], reason: str
) -> None:
    good = ["s3://b/ok.jpg", "abc", 10, None]
    received = parse_message((_body(good, entry),), {})
    assert [r.uri for r in received.job.images] == ["s3://b/ok.jpg"]
    assert len(received.rejected) == 1 and reason in received.rejected[0].reason


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((_body(["s3://b/k", None, None, None]), "2"), {}, "attempt '2'"),
        ((_body(["s3://b/k", None, None, None]), 0), {}, "attempt 0"),
        ((_body(["s3://b/k", None, None, None]), True), {}, "attempt True"),
        ((), {}, "no job body"),
        ((_body(["s3://b/k", None, None, None]),), {"colour": "red"}, "unexpected"),
        ((_body(["s3://b/k", None, None, None], job_id="j" * 129),), {}, "job id is 129"),
        ((_body(["s3:///k", None, None, None]),), {}, "no usable image entry"),
        (({**_body(["s3://b/k", None, None, None]), "pad": "x" * 5_000_000},), {}, "bytes"),
    ],
)
def test_a_bad_envelope_is_malformed_with_a_specific_reason(
    args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(MalformedJob, match=reason.replace("(", r"\(")):
        parse_message(args, kwargs)


def test_a_well_formed_message_round_trips() -> None:
    job = Job.new([ImageRef("s3://b/a b+ü.jpg", bucket="b", key="a b+ü.jpg", etag="e")], "c")
    received = parse_message((json.loads(json.dumps(job.to_wire())), 3), {})
    assert received.job == job and received.attempt == 3 and received.rejected == ()


def test_derived_job_ids_are_new_every_time_and_stay_short() -> None:
    parent = "c" * 96 + "-00000001"
    ids = {derived_job_id(parent, "r", 1) for _ in range(100)}
    assert len(ids) == 100
    deep = parent
    for attempt in range(1, 30):
        deep = derived_job_id(deep, "r", attempt)
        assert len(deep) <= MAX_JOB_ID_CHARS
    assert deep.startswith("c" * 96)
