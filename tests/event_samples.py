"""Event notifications exactly as AWS S3, EventBridge and SNS send them (shapes from the AWS
documentation; MinIO's `s3:`-prefixed names), for the events tests."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_plus


def s3_record(
    bucket: str,
    key: str,
    etag: str = "0123456789abcdef0123456789abcdef",
    size: int = 1024,
    name: str = "ObjectCreated:Put",
) -> dict[str, Any]:
    """One `Records[]` entry; the key form-encoded as S3 sends it ("a b+c" -> "a+b%2Bc")."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-12-02T06:00:00.000Z",
        "eventName": name,
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "EXAMPLE", "x-amz-id-2": "EXAMPLE"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "capworks",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "EXAMPLE"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe="/"),
                "size": size,
                "eTag": etag,
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def records(*recs: dict[str, Any]) -> bytes:
    """A notification body holding these records."""
    return json.dumps({"Records": list(recs)}).encode()


def s3_test_event(bucket: str) -> bytes:
    """The message S3 sends when notifications are configured."""
    return json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2026-12-02T06:00:00.000Z",
            "Bucket": bucket,
            "RequestId": "EXAMPLE",
            "HostId": "EXAMPLE",
        }
    ).encode()


def eventbridge(
    bucket: str,
    key: str,
    etag: str = "0123456789abcdef0123456789abcdef",
    detail_type: str = "Object Created",
) -> bytes:
    """An EventBridge S3 event; its key is not form-encoded."""
    return json.dumps(
        {
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": detail_type,
            "source": "aws.s3",
            "account": "111122223333",
            "time": "2026-12-02T06:00:00Z",
            "region": "us-east-1",
            "resources": [f"arn:aws:s3:::{bucket}"],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {
                    "key": key,
                    "size": 1024,
                    "etag": etag,
                    "sequencer": "00617F08299329D189",
                },
                "request-id": "N4N7GDK58NMKJ12R",
                "requester": "123456789012",
                "source-ip-address": "1.2.3.4",
                "reason": "PutObject",
            },
        }
    ).encode()


def sns_wrapped(message: bytes) -> bytes:
    """An SNS notification carrying an S3 event as its Message string."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:capworks",
            "Subject": "Amazon S3 Notification",
            "Message": message.decode(),
            "Timestamp": "2026-12-02T06:00:00.000Z",
            "SignatureVersion": "1",
        }
    ).encode()
