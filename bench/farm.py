"""The farm's faults at full size: the namespace farm of tests/farm/ (three worker hosts with one
hostname, each `capworks worker --gpus cpu` as PID 1, a services host with Redis and PostgreSQL,
a producer host) runs its fault tests on 1,000 images each, the Redis partition 120 s, and this
prints RELIABILITY.md's farm table from the figures each test recorded. The Redis failover
(tests/farm/test_farm_failover.py: two worker hosts behind Sentinels) crawls as many images; the
slow network (tests/farm/test_farm_slow_network.py) four runs of a quarter of them, clean and
slow alternating. A test's "wall vs calm" is against the calm run of the same invocation
(`-k "calm or ..."`); the slow network's against its own clean runs.

    .venv/bin/python bench/farm.py [--images 1000] [--redis-partition-s 120]
                                   [--pg-partition-s 60] [-k EXPR]

Needs root, iproute2, util-linux's unshare, iptables and the PostgreSQL server binaries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python bench/farm.py"
MODULES = ("test_farm_hosts.py", "test_farm_failover.py", "test_farm_slow_network.py")


def run_tests(args: argparse.Namespace, out: Path) -> int:
    """The farm tests at the given sizes, their figures appended to `out`."""
    env = {
        **os.environ,
        "CAPWORKS_FARM_IMAGES": str(args.images),
        "CAPWORKS_FARM_REDIS_PARTITION_S": str(args.redis_partition_s),
        "CAPWORKS_FARM_PG_PARTITION_S": str(args.pg_partition_s),
        "CAPWORKS_FARM_SLOW_IMAGES": str(args.images // 4),
        "CAPWORKS_FARM_OUT": str(out),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    cmd = [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-n", "0"]
    cmd += [f"tests/farm/{name}" for name in MODULES]
    cmd += ["-k", args.k] if args.k else []
    return subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode


def table(rows: list[dict[str, object]], command: str) -> str:
    """RELIABILITY.md's farm table: fault, load, lost, jobs run twice, recovery, wall vs calm."""
    lines = [
        "| fault | load | lost | jobs run twice | back / committed | wall vs calm | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        back, committed = row.get("back_in_queue_s"), row["recovery_s"]
        recovery = f"{back} s / {committed[0]} s" if committed else "n/a"  # type: ignore[index]
        ratio = row["wall_vs_calm"]
        lines.append(
            f"| {row['fault']} | {row['images']} images, {row.get('worker_hosts', 3)} worker "
            f"hosts | {row['lost']} "
            f"| {row['jobs_run_twice']} (of {row['held_at_fault']} held at the fault) "
            f"| {recovery} | {row['wall_s']} s ({f'{ratio}x' if ratio else 'no calm run'}) "
            f"| `{command}` |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--redis-partition-s", type=float, default=120)
    parser.add_argument("--pg-partition-s", type=float, default=60)
    parser.add_argument("-k", default="", help="only the tests matching this pytest expression")
    args = parser.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "farm.jsonl"
        status = run_tests(args, out)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(table(rows, " ".join([COMMAND, *sys.argv[1:]])))
    return status


if __name__ == "__main__":
    sys.exit(main())
