"""`FakeListServer`: a stand-in S3 endpoint that answers ListObjectsV2 alone, from keys held in
memory, with pre-rendered pages and a fixed delay per page: the client side of a listing
measured without SeaweedFS's CPU on the same 2 cores (a bench-only stand-in, not a test
double of any code path: SeaweedFS is measured beside it).

One asyncio process: each request is parsed, its page looked up (rendered once, then cached)
and answered after `delay_s` without holding a thread. It understands what a crawl's listing
sends: path-style `GET /<bucket>?list-type=2` with `prefix`, `delimiter` (`/`),
`start-after`, `continuation-token`, `max-keys` and `encoding-type=url`.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import escape

PAGE_KEYS = 1000


class FakeListServer:
    """ListObjectsV2 pages of one bucket's `keys`, each answered `delay_s` after its request."""

    def __init__(self, bucket: str, keys: list[str], delay_s: float) -> None:
        self.bucket = bucket
        self.keys = sorted(keys)
        self.delay_s = delay_s
        self._pages: dict[tuple[str, str, str, int, bool], bytes] = {}

    def page(self, prefix: str, delimiter: str, after: str, max_keys: int, url: bool) -> bytes:
        """The rendered page of keys under `prefix` after `after` (cached)."""
        cache_key = (prefix, delimiter, after, max_keys, url)
        if cache_key not in self._pages:
            self._pages[cache_key] = self._render(prefix, delimiter, after, max_keys, url)
        return self._pages[cache_key]

    def _render(self, prefix: str, delimiter: str, after: str, max_keys: int, url: bool) -> bytes:
        at = bisect.bisect_right(self.keys, after) if after else 0
        if delimiter and after.endswith(delimiter):  # a folder handed out: past its keys
            at = bisect.bisect_left(self.keys, after + "\U0010ffff")
        at = max(at, bisect.bisect_left(self.keys, prefix))
        contents: list[str] = []
        folders: list[str] = []
        last = ""
        while at < len(self.keys) and len(contents) + len(folders) < max_keys:
            key = self.keys[at]
            if not key.startswith(prefix):
                break
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                folder = prefix + rest[: rest.index(delimiter) + 1]
                folders.append(folder)
                last = folder
                at = bisect.bisect_left(self.keys, folder + "\U0010ffff")  # past the folder
                continue
            contents.append(key)
            last = key
            at += 1
        more = at < len(self.keys) and self.keys[at].startswith(prefix)
        enc = (lambda text: quote(text, safe="/")) if url else escape  # noqa: E731
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult '
            'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{self.bucket}</Name><Prefix>{enc(prefix)}</Prefix>",
            f"<MaxKeys>{max_keys}</MaxKeys><KeyCount>{len(contents) + len(folders)}</KeyCount>",
            f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        if more:
            parts.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        for key in contents:
            parts.append(
                f"<Contents><Key>{enc(key)}</Key><LastModified>2026-12-06T00:00:00.000Z"
                '</LastModified><ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag><Size>0</Size>'
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for folder in folders:
            parts.append(f"<CommonPrefixes><Prefix>{enc(folder)}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        return "".join(parts).encode()

    def answer(self, target: str) -> tuple[int, bytes]:
        """(status, body) for one request target."""
        split = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if split.path.strip("/") != self.bucket or query.get("list-type") != "2":
            return 404, b"<Error><Code>NoSuchKey</Code></Error>"
        token = query.get("continuation-token", "")
        after = max(token, query.get("start-after", ""))
        body = self.page(
            query.get("prefix", ""),
            query.get("delimiter", ""),
            after,
            int(query.get("max-keys", PAGE_KEYS)),
            query.get("encoding-type") == "url",
        )
        return 200, body

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode()
                _, target, _ = request_line.split(" ", 2)
                status, body = self.answer(target)
                await asyncio.sleep(self.delay_s)
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                    f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def serve(self, ports: Connection) -> None:
        """Serve on a free loopback port (sent through `ports`) until killed."""

        async def main() -> None:
            server = await asyncio.start_server(self._serve_one, "127.0.0.1", 0, backlog=256)
            ports.send(server.sockets[0].getsockname()[1])
            async with server:
                await server.serve_forever()

        asyncio.run(main())


@contextmanager
def fake_list_server(bucket: str, keys: list[str], delay_s: float) -> Iterator[str]:
    """A `FakeListServer` in a process of its own; yields its endpoint, stops it afterwards."""
    ours, theirs = multiprocessing.Pipe()
    server = FakeListServer(bucket, keys, delay_s)
    process = multiprocessing.Process(target=server.serve, args=(theirs,), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{ours.recv()}"
    finally:
        process.terminate()
        process.join()
