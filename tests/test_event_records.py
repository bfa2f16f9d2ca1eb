"""Event records parsed as AWS S3, EventBridge, SNS, MinIO and the SeaweedFS filer send them."""

from __future__ import annotations

import base64
import io
import json

import pytest
from event_samples import eventbridge, records, s3_record, s3_test_event, sns_wrapped

from capworks.producer.events.filer import change_from_json, iter_json_objects
from capworks.producer.events.records import MalformedEvent, ObjectCreated, parse_body

AWKWARD = ["red flower.jpg", "a+b.png", "100%.jpeg", "ünïcödé/猫.png", "dir/sub/mixed + ü %2B.webp"]


@pytest.mark.parametrize("key", AWKWARD)
def test_form_encoded_keys_are_decoded(key: str) -> None:
    parsed = parse_body(records(s3_record("photos", key)))
    assert [e.key for e in parsed.created] == [key]
    assert parsed.created[0].uri == f"s3://photos/{key}"


def test_moto_style_slash_encoding_is_decoded_too() -> None:
    record = s3_record("photos", "x")
    record["s3"]["object"]["key"] = "dir%2Fa+b.jpg"
    assert parse_body(records(record)).created[0].key == "dir/a b.jpg"


def test_test_event_deletes_and_non_images_are_ignored() -> None:
    assert parse_body(s3_test_event("photos")).ignored == 1
    body = records(
        s3_record("photos", "gone.jpg", name="ObjectRemoved:Delete"),
        s3_record("photos", "notes.txt"),
        s3_record("photos", "kept.JPG"),
    )
    parsed = parse_body(body)
    assert parsed.ignored == 2 and [e.key for e in parsed.created] == ["kept.JPG"]


def test_multipart_completion_and_minio_names_are_creations() -> None:
    body = records(
        s3_record("photos", "big.jpg", etag="abc-3", name="ObjectCreated:CompleteMultipartUpload"),
        s3_record("photos", "minio.png", name="s3:ObjectCreated:Put"),
    )
    created = parse_body(body).created
    assert [(e.key, e.etag) for e in created] == [
        ("big.jpg", "abc-3"),
        ("minio.png", created[1].etag),
    ]


def test_eventbridge_keys_are_taken_verbatim_and_other_types_ignored() -> None:
    parsed = parse_body(eventbridge("photos", "a+b c%20.png", etag="e1"))
    assert parsed.created == [ObjectCreated("photos", "a+b c%20.png", "e1", 1024, None)]
    assert parse_body(eventbridge("photos", "x.png", detail_type="Object Deleted")).ignored == 1


def test_sns_wrapped_records_and_eventbridge_are_unwrapped() -> None:
    inner = records(s3_record("photos", "red flower.jpg"))
    assert parse_body(sns_wrapped(inner)).created[0].key == "red flower.jpg"
    assert parse_body(sns_wrapped(eventbridge("photos", "p.png"))).created[0].key == "p.png"


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1, 2]", b'{"hello": 1}', b'{"Records": 5}', b"\xff"]
)
def test_bodies_that_are_no_notification_are_malformed(body: bytes) -> None:
    with pytest.raises(MalformedEvent):
        parse_body(body)


def test_a_bad_record_is_reported_and_its_neighbours_go_on() -> None:
    no_key = s3_record("photos", "x.jpg")
    del no_key["s3"]["object"]["key"]
    bad_utf8 = s3_record("photos", "x.jpg")
    bad_utf8["s3"]["object"]["key"] = "%FF%FE.jpg"
    parsed = parse_body(records(no_key, s3_record("photos", "fine.png"), bad_utf8, "junk"))  # type: ignore[arg-type]
    assert [e.key for e in parsed.created] == ["fine.png"]
    assert len(parsed.bad) == 3
    assert "no bucket or object key" in parsed.bad[0].reason
    assert "not URL-encoded UTF-8" in parsed.bad[1].reason


def _filer_doc(
    parent: str, name: str, etag: str | None, old: bool = False, new: bool = True
) -> dict:
    entry = {
        "name": name,
        "isDirectory": False,
        "attributes": {"fileSize": "5", "md5": base64.b64encode(b"\x01" * 16).decode()},
        "extended": {"Seaweed-X-Amz-ETag": base64.b64encode(etag.encode()).decode()}
        if etag
        else {},
    }
    return {
        "directory": parent,
        "eventNotification": {
            "oldEntry": entry if old else None,
            "newEntry": entry if new else None,
            "newParentPath": parent if new else "",
        },
        "tsNs": "1796192425317457551",
    }


def test_filer_changes_become_created_objects_with_the_s3_etag() -> None:
    change = change_from_json(_filer_doc("/buckets/photos/dir", "a b+c.png", "abc-2"))
    assert change.ts_ns == 1796192425317457551
    assert change.created == ObjectCreated("photos", "dir/a b+c.png", "abc-2", 5)
    no_s3_etag = change_from_json(_filer_doc("/buckets/photos", "f.png", None)).created
    assert no_s3_etag is not None and no_s3_etag.etag == "01" * 16  # the filer's own md5


@pytest.mark.parametrize(
    "doc",
    [
        _filer_doc("/buckets/photos", "gone.png", "e", old=True, new=False),  # a delete
        _filer_doc("/buckets/photos/.uploads/123", "0001_x.part", "e"),  # a multipart part
        _filer_doc("/buckets/.system/owners", "o.png", "e"),
        _filer_doc("/buckets/photos", "notes.txt", "e"),
        _filer_doc("/elsewhere", "x.png", "e"),
    ],
)
def test_filer_changes_that_are_not_new_images_are_ignored(doc: dict) -> None:
    assert change_from_json(doc).created is None


def test_pretty_printed_objects_are_read_across_chunk_boundaries() -> None:
    docs = [_filer_doc("/buckets/p", f"{i}.png", "e") for i in range(3)]
    text = "".join(json.dumps(d, indent=2) + "\n" for d in docs).encode()

    class Trickle(io.BytesIO):
        def read1(self, size: int = -1) -> bytes:
            return super().read1(7)

    assert list(iter_json_objects(Trickle(text))) == docs
