"""ListObjectsV2 pages parsed by `schema/list_pages.py` instead of botocore's parser (the CPU
that capped concurrent listing streams): against a real SeaweedFS, every field a crawl or the
paginator reads comes out as botocore gives it, for awkward keys, folders and several pages,
and the client a crawl builds (`make_s3_client`) uses it."""

from __future__ import annotations

import uuid
from typing import Any

from conftest import s3_client

from capworks.schema.list_pages import _usual_contents, parse_list_page, use_fast_list_parser
from capworks.schema.settings import Settings
from capworks.schema.storage import make_s3_client

KEYS = [
    "a & b <c> \"d\" 'e'.png",
    "plus+sign and space.png",
    "ünïcödé/日本.jpg",
    "cats/01.png",
    "cats/02.png",
    "cats.png",
    "percent%20kept.png",
    "dogs/old/03.png",
    "tab\tand\x7fdel.png",
]
FIELDS = ("Key", "ETag", "Size", "LastModified")


def pages(client: Any, bucket: str, **options: Any) -> list[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    result = []
    for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 3}, **options):
        result.append(
            {
                "Contents": [{f: obj.get(f) for f in FIELDS} for obj in page.get("Contents", [])],
                "CommonPrefixes": page.get("CommonPrefixes", []),
                "IsTruncated": page["IsTruncated"],
                "KeyCount": page.get("KeyCount"),
            }
        )
    return result


def test_pages_parsed_fast_are_what_botocore_parses_for_awkward_keys_folders_and_pages(
    s3_endpoint: str,
) -> None:
    plain = s3_client(s3_endpoint)
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    plain.create_bucket(Bucket=bucket)
    for n, key in enumerate(KEYS):
        plain.put_object(Bucket=bucket, Key=key, Body=b"x" * n)
    fast = s3_client(s3_endpoint)
    use_fast_list_parser(fast)

    for options in ({}, {"Delimiter": "/"}, {"Prefix": "cats/"}, {"StartAfter": "cats.png"}):
        expected = pages(plain, bucket, **options)
        assert pages(fast, bucket, **options) == expected, options
        assert len(expected) > 1 or options
    assert {obj["Key"] for page in pages(fast, bucket) for obj in page["Contents"]} == set(KEYS)


def test_a_page_body_is_parsed_without_a_server() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        b"<Prefix></Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys><IsTruncated>true"
        b"</IsTruncated><Contents><Key>x &amp; y.png</Key><LastModified>2026-12-05T10:00:00.000Z"
        b"</LastModified><ETag>&quot;abc&quot;</ETag><Size>7</Size><Owner><ID>1</ID>"
        b"<DisplayName>me</DisplayName></Owner><StorageClass>STANDARD</StorageClass></Contents>"
        b"<CommonPrefixes><Prefix>cats/</Prefix></CommonPrefixes>"
        b"<NextContinuationToken>tok</NextContinuationToken></ListBucketResult>"
    )
    page = parse_list_page(body)
    assert page["Contents"][0]["Key"] == "x & y.png" and page["Contents"][0]["Size"] == 7
    assert page["Contents"][0]["ETag"] == '"abc"'
    assert str(page["Contents"][0]["LastModified"]) == "2026-12-05 10:00:00+00:00"
    assert page["CommonPrefixes"] == [{"Prefix": "cats/"}]
    assert (page["IsTruncated"], page["NextContinuationToken"], page["KeyCount"]) == (
        True,
        "tok",
        2,
    )
    assert page["Name"] == "b"


def test_the_client_a_crawl_builds_parses_list_pages_fast(s3_endpoint: str) -> None:
    plain = s3_client(s3_endpoint)
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    plain.create_bucket(Bucket=bucket)
    plain.put_object(Bucket=bucket, Key="one.png", Body=b"x")
    settings = Settings(
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id="test",
        s3_secret_access_key="test",
        s3_region="us-east-1",
        s3_addressing_style="path",
    )
    [botocores] = plain.list_objects_v2(Bucket=bucket)["Contents"]
    [ours] = make_s3_client(settings).list_objects_v2(Bucket=bucket)["Contents"]
    # The fast parser reads only the fields a crawl uses: botocore's also has StorageClass.
    assert "StorageClass" in botocores and set(ours) == set(FIELDS)
    assert {f: botocores[f] for f in FIELDS} == ours


WHOLE_PAGE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/'
    b'doc/2006-03-01/"><Name>b</Name><KeyCount>1</KeyCount><IsTruncated>false</IsTruncated>'
    b"<Contents><Key>a.png</Key><Size>3</Size></Contents></ListBucketResult>\n"
)


def before_parse(body: bytes, operation: str = "ListObjectsV2") -> tuple[int, dict[str, Any]]:
    """(status botocore goes on with, what the hooks parsed) for a 200 response of `body`,
    through the `before-parse` hooks of the client a crawl builds (no request is made)."""
    settings = Settings(s3_access_key_id="k", s3_secret_access_key="s", s3_region="us-east-1")
    client = make_s3_client(settings)
    response = {"status_code": 200, "headers": {}, "body": body}
    parsed: dict[str, Any] = {}
    client.meta.events.emit(
        f"before-parse.s3.{operation}",
        operation_model=client.meta.service_model.operation_model(operation),
        response_dict=response,
        customized_response_dict=parsed,
    )
    return response["status_code"], parsed  # type: ignore[return-value]


def test_a_whole_page_is_parsed_once_and_a_page_cut_short_or_an_error_is_retried() -> None:
    status, parsed = before_parse(WHOLE_PAGE)
    assert status == 200 and parsed["Contents"] == [{"Key": "a.png", "Size": 3}]
    # Cut short by the network: not parsed here (keys would be lost), but a 500 to retry.
    assert before_parse(WHOLE_PAGE[:-40]) == (500, {})
    error = b"<Error><Code>InternalError</Code><Message>retry</Message></Error>"
    assert before_parse(error) == (500, {})
    assert before_parse(error, "ListBuckets") == (500, {})  # other calls keep botocore's check


def test_objects_in_any_field_order_or_with_checksums_parse_alike() -> None:
    usual = (
        b"<Contents><Key>a.png</Key><LastModified>2026-12-05T10:00:00.000Z</LastModified>"
        b"<ETag>&quot;e1&quot;</ETag><ChecksumAlgorithm>CRC32</ChecksumAlgorithm>"
        b"<ChecksumType>FULL_OBJECT</ChecksumType><Size>5</Size></Contents>"
    )
    reordered = (
        b"<Contents><Size>6</Size><Key>b &amp; c.png</Key><ETag>&quot;e2&quot;</ETag>"
        b"<LastModified>2026-12-05T11:00:00.000Z</LastModified></Contents>"
    )
    page = b"<ListBucketResult><Name>b</Name>%s</ListBucketResult>"
    a = parse_list_page(page % usual)["Contents"]
    both = parse_list_page(page % (usual + reordered))["Contents"]
    assert [(o["Key"], o["ETag"], o["Size"]) for o in both] == [
        ("a.png", '"e1"', 5),
        ("b & c.png", '"e2"', 6),
    ]
    assert both[0] == a[0] and str(both[1]["LastModified"]) == "2026-12-05 11:00:00+00:00"


def test_seaweedfs_pages_take_the_one_pattern_pass(s3_endpoint: str) -> None:
    client = s3_client(s3_endpoint)
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for key in KEYS:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    bodies: list[bytes] = []
    client.meta.events.register(
        "before-parse.s3.ListObjectsV2",
        lambda response_dict, **_: bodies.append(response_dict["body"]),
    )
    client.list_objects_v2(Bucket=bucket)
    [body] = bodies
    assert body.count(b"<Contents>") == len(KEYS)
    assert _usual_contents(body) == parse_list_page(body)["Contents"]
