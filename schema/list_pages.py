"""ListObjectsV2 pages parsed by one regular-expression pass instead of botocore's parser.

botocore parses a page of 1,000 keys through its shape model, element by element, in Python:
tens of milliseconds of CPU that hold the GIL, so concurrent listing streams (threads) are
CPU-bound long before the network is (issue 25: 32 streams gave 2.4x one stream). A listing
page is flat and small: each `<Contents>` holds a few fields, none of which can hold a raw `<`.
`parse_list_page` reads the fields a crawl and botocore's paginator use (keys, ETags, sizes,
modification times, common prefixes, truncation and the continuation token) several times
faster; `use_fast_list_parser` plugs it into a client through botocore's `before-parse` event,
so signing, retries, errors, pagination and the URL-decoding of keys stay botocore's.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from typing import Any

from botocore import handlers
from botocore.utils import parse_timestamp

_CONTENTS = re.compile(rb"<Contents>(.*?)</Contents>", re.S)
_FIELD = re.compile(rb"<(Key|LastModified|ETag|Size)>([^<]*)</")
# An object's fields as S3 writes them (Key, LastModified, ETag, checksums, Size) and as
# SeaweedFS does (Key, ETag, Size, StorageClass, LastModified): groups key, time, ETag, size.
_USUAL = (
    (
        re.compile(
            rb"<Contents><Key>([^<]*)</Key><LastModified>([^<]*)</LastModified><ETag>([^<]*)"
            rb"</ETag>(?:<Checksum\w*>[^<]*</Checksum\w*>)*<Size>([0-9]+)</Size>"
        ),
        (0, 1, 2, 3),
    ),
    (
        re.compile(
            rb"<Contents><Key>([^<]*)</Key><ETag>([^<]*)</ETag><Size>([0-9]+)</Size>"
            rb"(?:<StorageClass>[^<]*</StorageClass>)?<LastModified>([^<]*)</LastModified>"
        ),
        (0, 3, 1, 2),
    ),
)
_COMMON = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")
_TOP = re.compile(
    rb"<(IsTruncated|NextContinuationToken|KeyCount|MaxKeys|EncodingType|Name)>([^<]*)</"
)
_INTS = ("KeyCount", "MaxKeys")
FAST_PARSER_ID = "capworks-fast-list-parser"  # its handler's unique_id on a client's events
CHECK_200_ID = "capworks-200-error-check"  # the 200-error check's, in place of botocore's
# botocore's own (a private name: where a botocore lacks it, its check is left in place)
_BOTOCORE_200_CHECK: Any = getattr(handlers, "_handle_200_error", None)


def _text(raw: bytes) -> str:
    """An element's text: XML entities (`&amp;`, `&quot;`, `&#x1F;`) resolved."""
    text = raw.decode()
    return html.unescape(text) if "&" in text else text


def parse_list_page(body: bytes) -> dict[str, Any]:
    """The parsed ListObjectsV2 result of a `ListBucketResult` body, as botocore gives it for
    the fields read here (`Contents` Key/ETag/Size/LastModified, `CommonPrefixes`, ...)."""
    page: dict[str, Any] = {}
    # None of these names is a field of `Contents` or `CommonPrefixes`: the whole body is read.
    for name, raw in _TOP.findall(body):
        key = name.decode()
        value = _text(raw)
        page[key] = value == "true" if key == "IsTruncated" else value
        if key in _INTS:
            page[key] = int(value)
    contents = _usual_contents(body)
    if contents is None:
        contents = [_contents_item(block.group(1)) for block in _CONTENTS.finditer(body)]
    if contents:
        page["Contents"] = contents
    prefixes = [{"Prefix": _text(raw)} for raw in _COMMON.findall(body)]
    if prefixes:
        page["CommonPrefixes"] = prefixes
    page.setdefault("IsTruncated", False)
    return page


def _usual_contents(body: bytes) -> list[dict[str, Any]] | None:
    """The objects of a page whose every `<Contents>` is laid out as S3 or SeaweedFS writes it,
    read by one pass of one pattern (a third of the CPU of a pass per object); None when
    some object is laid out otherwise, for `_contents_item` to read."""
    count = body.count(b"<Contents>")
    for pattern, (k, t, e, n) in _USUAL:
        found = pattern.findall(body)
        if len(found) == count:
            return [
                {
                    "Key": _text(f[k]),
                    "ETag": _text(f[e]),
                    "Size": int(f[n]),
                    "LastModified": _timestamp(f[t].decode()),
                }
                for f in found
            ]
    return None


def _contents_item(block: bytes) -> dict[str, Any]:
    """One object of a page, from its `<Contents>` element's inside, fields in any order."""
    fields = dict(_FIELD.findall(block))
    item: dict[str, Any] = {"Key": _text(fields[b"Key"])}
    if b"ETag" in fields:
        item["ETag"] = _text(fields[b"ETag"])
    if b"Size" in fields:
        item["Size"] = int(fields[b"Size"])
    if b"LastModified" in fields:
        item["LastModified"] = _timestamp(fields[b"LastModified"].decode())
    return item


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return parse_timestamp(text)  # type: ignore[no-any-return]


def is_whole_page(response_dict: dict[str, Any]) -> bool:
    """True for a 200 response whose body is a whole `ListBucketResult` document (not an
    error, nor a page cut short by the network)."""
    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not isinstance(body, bytes):
        return False
    return b"<ListBucketResult" in body[:512] and body.rstrip().endswith(b"</ListBucketResult>")


def _before_parse(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """botocore's `before-parse` hook: a whole page is parsed here and botocore is left an
    empty result to parse (errors and anything unexpected go to botocore as they came)."""
    if not is_whole_page(response_dict):
        return
    customized_response_dict.update(parse_list_page(response_dict["body"]))
    response_dict["body"] = b"<ListBucketResult></ListBucketResult>"


def _check_200_error(operation_model: Any, response_dict: dict[str, Any], **kwargs: Any) -> None:
    """botocore's check for an S3 error sent with status 200, which parses every body with
    ElementTree (a fifth of a 32-stream listing's CPU): skipped for a whole list page, which
    is no error; anything else, a page cut short included, is checked as botocore does."""
    if operation_model.name == "ListObjectsV2" and is_whole_page(response_dict):
        return
    _BOTOCORE_200_CHECK(operation_model, response_dict, **kwargs)


def use_fast_list_parser(s3_client: Any) -> None:
    """Have this client parse its ListObjectsV2 pages with `parse_list_page`, and not parse a
    whole page a second time to see whether it is an error."""
    events = s3_client.meta.events
    events.register("before-parse.s3.ListObjectsV2", _before_parse, unique_id=FAST_PARSER_ID)
    if _BOTOCORE_200_CHECK is not None:
        events.unregister("before-parse.s3.*", _BOTOCORE_200_CHECK)
        events.register_first("before-parse.s3.*", _check_200_error, unique_id=CHECK_200_ID)
