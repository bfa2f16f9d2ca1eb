"""An event job carries its objects' upload time from the storage event to the worker, which
observes upload -> caption latency from it; old messages and crawled jobs carry none."""

from __future__ import annotations

import json
from typing import Any

import pytest
from event_samples import eventbridge, records, s3_record

from capworks.producer.events.filer import change_from_json
from capworks.producer.events.records import ObjectCreated, event_time_s, parse_body
from capworks.schema.errors import Code
from capworks.schema.jobs import Job, MalformedJob, derived_job_id, parse_message
from capworks.schema.uris import ImageRef
from capworks.workers.metrics import MAX_CLOCK_SKEW_S, upload_latency_s

# 2026-12-02T06:00:00Z, the time of the samples in event_samples.py.
SAMPLE_TIME_S = 1_796_191_200.0
REF = ImageRef(uri="s3://b/k.png", bucket="b", key="k.png", etag="e", size_bytes=5)


def _body(**extra: Any) -> dict[str, Any]:
    return {"v": 1, "id": "j1", "images": [["s3://b/k.png", "e", 5, None]], **extra}


# --- the job message ----------------------------------------------------------------------------


def test_upload_time_survives_the_wire_and_json() -> None:
    job = Job.new([REF], model=("m", "r", "h"), upload_time_s=SAMPLE_TIME_S + 0.125)
    wire = json.loads(json.dumps(job.to_wire()))
    assert wire["v"] == 1 and wire["uploaded"] == SAMPLE_TIME_S + 0.125
    assert Job.from_wire(wire) == job


def test_a_message_without_upload_time_still_validates_and_writes_none() -> None:
    job = Job.from_wire(_body())
    assert job.upload_time_s is None
    assert "uploaded" not in job.to_wire()  # an old worker reads what a crawl sends unchanged


def test_an_integer_upload_time_is_read_as_seconds() -> None:
    assert Job.from_wire(_body(uploaded=1_796_191_200)).upload_time_s == SAMPLE_TIME_S


def test_retries_and_splits_keep_the_upload_time() -> None:
    job = Job.new([REF, REF], upload_time_s=SAMPLE_TIME_S)
    again = job.derived([REF], derived_job_id(job.job_id, "r", 1))
    assert again.upload_time_s == SAMPLE_TIME_S
    assert Job.from_wire(again.to_wire()).upload_time_s == SAMPLE_TIME_S


@pytest.mark.parametrize(
    "uploaded",
    ["2026-12-02T06:00:00Z", True, [SAMPLE_TIME_S], -1, float("nan"), float("inf"), 2**70],
)
def test_an_upload_time_that_is_not_unix_seconds_makes_the_message_malformed(
    uploaded: object,
) -> None:
    with pytest.raises(MalformedJob) as info:
        parse_message((_body(uploaded=uploaded),), {})
    assert info.value.code is Code.MALFORMED_MESSAGE and "uploaded" in info.value.message


def test_an_upload_time_far_in_the_future_validates_and_is_left_to_the_worker() -> None:
    milliseconds = SAMPLE_TIME_S * 1000  # a producer that sent milliseconds by mistake
    assert Job.from_wire(_body(uploaded=milliseconds)).upload_time_s == milliseconds


# --- the worker's latency -----------------------------------------------------------------------


def test_latency_is_now_minus_upload_time() -> None:
    assert upload_latency_s(SAMPLE_TIME_S, SAMPLE_TIME_S + 42.5) == 42.5


def test_clock_skew_counts_as_zero_latency() -> None:
    assert upload_latency_s(SAMPLE_TIME_S + 3.0, SAMPLE_TIME_S) == 0.0
    assert upload_latency_s(SAMPLE_TIME_S + MAX_CLOCK_SKEW_S, SAMPLE_TIME_S) == 0.0


def test_no_upload_time_or_one_far_in_the_future_is_not_observed() -> None:
    assert upload_latency_s(None, SAMPLE_TIME_S) is None
    assert upload_latency_s(SAMPLE_TIME_S + MAX_CLOCK_SKEW_S + 1, SAMPLE_TIME_S) is None
    assert upload_latency_s(SAMPLE_TIME_S * 1000, SAMPLE_TIME_S) is None


# --- the storage events -------------------------------------------------------------------------


def test_s3_records_and_eventbridge_events_carry_their_event_time() -> None:
    [record] = parse_body(records(s3_record("photos", "a.png"))).created
    [bridge] = parse_body(eventbridge("photos", "b.png")).created
    assert record.upload_time_s == bridge.upload_time_s == SAMPLE_TIME_S


def test_a_record_with_a_missing_or_unreadable_time_is_captioned_without_one() -> None:
    missing, garbage, early = (s3_record("photos", f"{n}.png") for n in "abc")
    del missing["eventTime"]
    garbage["eventTime"] = "yesterday"
    early["eventTime"] = "1969-12-31T23:59:59Z"
    created = parse_body(records(missing, garbage, early)).created
    assert [e.key for e in created] == ["a.png", "b.png", "c.png"]
    assert [e.upload_time_s for e in created] == [None, None, None]


def test_event_times_with_fractions_offsets_or_no_zone_are_read_as_utc() -> None:
    assert event_time_s("2026-12-02T06:00:00.250Z") == SAMPLE_TIME_S + 0.25
    assert event_time_s("2026-12-02T07:00:00+01:00") == SAMPLE_TIME_S
    assert event_time_s("2026-12-02T06:00:00") == SAMPLE_TIME_S
    assert event_time_s(1_796_191_200) is None


def test_two_deliveries_of_one_object_are_equal_whatever_their_times() -> None:
    assert ObjectCreated("p", "k.png", "e", upload_time_s=1.0) == ObjectCreated("p", "k.png", "e")


def test_a_filer_change_carries_its_time_in_seconds() -> None:
    doc = {
        "directory": "/buckets/photos",
        "eventNotification": {
            "newEntry": {"name": "a.png", "attributes": {"fileSize": "5"}},
            "newParentPath": "/buckets/photos",
        },
        "tsNs": "1796191200250000000",
    }
    created = change_from_json(doc).created
    assert created is not None and created.upload_time_s == SAMPLE_TIME_S + 0.25
