"""What one lease reap costs as the Redis keyspace grows: the reap (`workers/leases.py`, one
script over the lease structures and kombu's index) against the key SCAN the reaper used before,
at 0, 1M and 10M unrelated keys, on a redis-server of its own on 127.0.0.1 (DEBUG POPULATE
fills it). Prints each time and the ratio, measured in one run.

    .venv/bin/python bench/lease_reap.py [--keys 0,1000000,10000000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import time

import redis

from capworks.workers.leases import LeaseKeeper

HELD = 200  # live jobs leased across the farm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scan_leases(r: redis.Redis) -> int:
    """The reaper's old way to find the live leases: SCAN every key for `capworks:lease:*`."""
    return sum(1 for _ in r.scan_iter(match="capworks:lease:*", count=1000))


def best_s(run: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", default="0,1000000,10000000")
    sizes = [int(n) for n in parser.parse_args().keys.split(",")]
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", data,
             "--save", "", "--appendonly", "no", "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            r = redis.Redis(port=port, socket_timeout=600, socket_connect_timeout=600)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            now = float(r.time()[0])
            r.zadd("unacked_index", {f"job-{i}": now for i in range(HELD)})
            keepers = [LeaseKeeper(r, f"bench-{w}", 8.0) for w in range(4)]
            for w, keeper in enumerate(keepers):
                keeper.renew([f"job-{i}" for i in range(w, HELD, 4)])
            print(f"{'keys':>12} {'reap ms':>9} {'old scan ms':>12} {'ratio':>8}")
            for size in sizes:
                have = r.dbsize()
                if size > have:
                    r.execute_command("DEBUG", "POPULATE", size, "filler")
                reap_s = best_s(keepers[0].reap)
                scan_s = best_s(lambda: scan_leases(r), repeat=1 if size > 1_000_000 else 3)
                print(f"{r.dbsize():>12,} {reap_s * 1000:>9.2f} {scan_s * 1000:>12.1f} "
                      f"{scan_s / reap_s:>7.0f}x")  # fmt: skip
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
