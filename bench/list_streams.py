"""Bucket listing with 1 vs 8 vs 32 concurrent ListObjectsV2 streams, when every list page
costs 50 ms more (as a round trip to AWS S3 does), in one run.

A scratch SeaweedFS server on 127.0.0.1 holds `--prefixes` folders of `--keys-per-prefix`
empty objects; a small loopback proxy in front of it forwards every request and sleeps
`--page-delay-ms` before each ListObjectsV2 (GETs with `list-type=2`). One stream is today's
crawl listing (`producer.sources.iter_s3`); N streams are `producer.listing`'s parallel
listing (delimiter discovery included in its time). Each runs with the client a crawl builds,
whose list pages `schema/list_pages.py` parses (and does not parse again for botocore's
200-error check), with that check put back, and with botocore's own parser (the way
before, with Python's default cyclic collector; the others with it as a crawl sets it,
`CRAWL_GC_THRESHOLDS`);
`list_pages` also with the streams in `--processes` listing processes (their
spawning counted); prints keys/s and the ratios to one stream of each, and to one stream
before, and each case's rate between 20% and 90% of its keys (a long crawl's, start left out).
`--servers fake` (or both, the default) lists the same keys from `FakeListServer`
(bench/fake_list_server.py: pre-rendered pages, the same delay, next to no server CPU), which
measures the listing's own side on a machine whose cores SeaweedFS would otherwise share.

    .venv/bin/python bench/list_streams.py [--prefixes 64] [--keys-per-prefix 1000]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import itertools
import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from botocore import handlers
from fake_list_server import fake_list_server
from seaweed import s3_client, scratch_s3

from capworks.producer.listing import CRAWL_GC_THRESHOLDS, ListingPlan, iter_parallel_pages
from capworks.producer.sources import iter_s3
from capworks.schema.list_pages import CHECK_200_ID, FAST_PARSER_ID
from capworks.schema.settings import Settings
from capworks.schema.storage import make_s3_client

BUCKET = "library"
DEFAULT_GC = gc.get_threshold()  # Python's own, as the crawl had it before
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def serve_proxy(upstream: str, delay_s: float, ports: Connection) -> None:
    """Run the proxy (in a process of its own: its threads must not hold the listing's GIL)."""
    target = urlsplit(upstream)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: thousands of requests
            pass

        def forward(self) -> None:
            if self.command == "GET" and "list-type=2" in self.path:
                time.sleep(delay_s)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection(host, port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            local.conn.request(self.command, self.path, body=body, headers=headers)
            reply = local.conn.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ports.send(server.server_address[1])
    server.serve_forever()


@contextmanager
def latency_proxy(upstream: str, delay_s: float) -> Iterator[str]:
    """A loopback HTTP proxy to `upstream` that delays each list request by `delay_s`; yields
    its endpoint and stops it afterwards."""
    ours, theirs = multiprocessing.Pipe()
    proxy = multiprocessing.Process(target=serve_proxy, args=(upstream, delay_s, theirs))
    proxy.daemon = True
    proxy.start()
    try:
        yield f"http://127.0.0.1:{ours.recv()}"
    finally:
        proxy.terminate()
        proxy.join()


PARSERS = {
    "botocore": "botocore (before)",
    "list_pages+check": "list_pages, botocore's 200 check back",
    "list_pages": "list_pages (now)",
}


def proxied_client(endpoint: str, parser: str = "list_pages") -> Any:
    """The client a crawl uses (`make_s3_client`), through the proxy; with botocore's own
    list-page parser (`botocore`), or with its check of every page for an error sent with
    status 200 (`list_pages+check`: that check as botocore runs it, on every page)."""
    settings = Settings(
        s3_endpoint_url=endpoint,
        s3_access_key_id="bench",
        s3_secret_access_key="bench",
        s3_region="us-east-1",
        s3_addressing_style="path",
    )
    client = make_s3_client(settings)
    events = client.meta.events
    if parser != "list_pages":  # botocore's 200-error check of every page back
        events.unregister("before-parse.s3.*", unique_id=CHECK_200_ID)
        events.register_first("before-parse.s3.*", handlers._handle_200_error)
    if parser == "botocore":
        events.unregister("before-parse.s3.ListObjectsV2", unique_id=FAST_PARSER_ID)
    return client


def bucket_keys(prefixes: int, per_prefix: int) -> list[str]:
    """The keys of `prefixes` camera-roll folders of `per_prefix` images."""
    return [f"cam{p:03d}/IMG_{n:05d}.jpg" for p in range(prefixes) for n in range(per_prefix)]


def fill_bucket(client: Any, keys: list[str]) -> None:
    """An empty object for each key."""
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b""), keys))


def list_keys(
    client: Any, streams: int, processes: int = 1, endpoint: str = ""
) -> list[tuple[float, int]]:
    """(seconds from the start, keys) of each page listed by one stream (today's crawl) or by
    `streams` parallel ones, in `processes` listing processes (each with a client like
    `client`, made anew: spawning included)."""
    source = f"s3://{BUCKET}/"
    begun = time.perf_counter()
    if streams == 1:
        refs = iter_s3(source, client)
        pages = iter(lambda: list(itertools.islice(refs, 1000)), [])
    else:
        factory = partial(proxied_client, endpoint) if processes > 1 else None
        plan = ListingPlan(streams=streams, processes=processes, client=factory)
        pages = (page for _, page in iter_parallel_pages(source, client, None, plan, 1000))
    return [(time.perf_counter() - begun, len(page)) for page in pages]


def mid_run(pages: list[tuple[float, int]], streams: int) -> str:
    """Keys/s between the pages at 20% and at 90% of the keys: a long crawl's rate, without
    the start (discovery, spawning listing processes, filling the merger) or the last parts;
    "n/a" where the streams list fewer than 10 pages each (the merger's bursts rule then)."""
    if len(pages) < 10 * streams:
        return "n/a"
    total, done, marks = sum(n for _, n in pages), 0, []
    for at, keys in pages:
        done += keys
        marks.append((at, done))
    (t0, k0), (t1, k1) = [next(m for m in marks if m[1] >= share * total) for share in (0.2, 0.9)]
    return f"{(k1 - k0) / (t1 - t0):,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=64)
    parser.add_argument("--keys-per-prefix", type=int, default=1000)
    parser.add_argument("--page-delay-ms", type=float, default=50.0)
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--servers", default="seaweedfs,fake", help="seaweedfs, fake or both")
    parser.add_argument("--parsers", default=",".join(PARSERS))
    parser.add_argument(
        "--processes", default="2", help="listing processes to try too (list_pages; 1: none)"
    )
    args = parser.parse_args()
    delay_s = args.page_delay_ms / 1000
    keys = bucket_keys(args.prefixes, args.keys_per_prefix)
    print(f"{args.page_delay_ms:.0f} ms added to each list page")
    print(
        "| server | page parser | streams | keys | seconds | keys/s | vs 1 stream | vs 1 before "
        "| keys/s mid-run |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    if "seaweedfs" in args.servers:
        with scratch_s3() as endpoint:
            started = time.perf_counter()
            fill_bucket(s3_client(endpoint), keys)
            put_s = time.perf_counter() - started
            print(f"{len(keys):,} objects in {args.prefixes} folders, put in {put_s:.0f} s")
            with latency_proxy(endpoint, delay_s) as proxied:
                run_counts("SeaweedFS + proxy", proxied, args, len(keys))
    if "fake" in args.servers:
        with fake_list_server(BUCKET, keys, delay_s) as endpoint:
            run_counts("FakeListServer", endpoint, args, len(keys))


def run_counts(server: str, endpoint: str, args: argparse.Namespace, total: int) -> None:
    """Each stream count with each page parser through `endpoint`, one row each."""
    before = None
    for name, parser in PARSERS.items():
        if name not in args.parsers.split(","):
            continue
        client = proxied_client(endpoint, name)
        # The collector as a crawl sets it (`collect_less`) for today's client; Python's
        # default for the way before.
        gc.set_threshold(*(DEFAULT_GC if name == "botocore" else CRAWL_GC_THRESHOLDS))
        base = None
        cases = [(int(s), 1) for s in args.streams.split(",")]
        if name == "list_pages":
            more = [int(p) for p in args.processes.split(",") if int(p) > 1]
            cases += [(streams, p) for p in more for streams, _ in cases if streams >= p]
        for streams, processes in cases:
            pages = list_keys(client, streams, processes, endpoint)
            listed, seconds = sum(n for _, n in pages), pages[-1][0]
            rate = listed / seconds
            base = base or rate
            before = before or rate
            label = parser if processes == 1 else f"{parser}, {processes} processes"
            print(
                f"| {server} | {label} | {streams} | {listed:,} | {seconds:.2f} | {rate:,.0f} | "
                f"{rate / base:.1f}x | {rate / before:.1f}x | {mid_run(pages, streams)} |",
                flush=True,
            )
            assert listed == total, f"listed {listed} of {total}"


if __name__ == "__main__":
    main()
