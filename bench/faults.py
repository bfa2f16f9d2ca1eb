"""Workers SIGKILLed at random moments, with the default lease and visibility settings: images
lost, caption rows doubled, and how long each dead process's jobs waited, against the same run
with no kills, in one go. The fault suite's harness (tests/faults/harness.py) does the work.

    .venv/bin/python bench/faults.py [--images 1000] [--kills 5] [--procs 2] [--bare]

Images: shapes scenes (PNG) in a scratch SeaweedFS bucket; results in a scratch PostgreSQL
database; jobs on Redis db 8. Workers: one supervised `capworks worker --cpu-procs N` (the
supervisor hands a dead child's jobs back at once), or with `--bare` N plain Celery worker
processes and no supervisor, restarted by this script (recovery by lease expiry alone, as after
a whole host is lost). One more kill than `--kills` hits a process while the farm is idle.
Time to recover a kill: from the SIGKILL to the first commit of a job the dead process held.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis
from scratch_pg import scratch_database
from seaweed import scratch_s3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faults.harness import Farm, clear, distinct_captioned, timed_crawl  # noqa: E402
from pipeline_support import count_rows, make_bucket  # noqa: E402

from capworks.checkpoints.build import ensure_checkpoint  # noqa: E402
from capworks.schema.db import connect  # noqa: E402
from capworks.schema.settings import get_settings  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/8"


def environment(db_url: str, endpoint: str) -> dict[str, str]:
    """A farm's environment: every lease and visibility setting at its default."""
    return {
        **os.environ,
        "CAPWORKS_DATABASE_URL": db_url,
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": f"bench-faults-{uuid.uuid4().hex[:8]}",
        "CAPWORKS_MODEL": "shapes",
        "CAPWORKS_DEVICE": "cpu",
        "CAPWORKS_S3_ENDPOINT_URL": endpoint,
        "CAPWORKS_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CAPWORKS_JOB_IMAGES": "16",
        "CAPWORKS_METRICS_PORT": "0",
        "CUDA_VISIBLE_DEVICES": "",
    }


def run(args: argparse.Namespace, db_url: str, endpoint: str, kills: int) -> dict[str, Any]:
    env = environment(db_url, endpoint)
    r = redis.Redis.from_url(REDIS_URL)
    logs = Path(tempfile.mkdtemp(prefix="capworks-faults-"))
    farm = Farm(env, args.procs, logs / "farm.log", bare=args.bare)

    def done() -> bool:
        rows = count_rows(db_url)
        queued = int(r.llen(env["CAPWORKS_QUEUE_NAME"])) + int(r.hlen("unacked"))
        return rows["captions"] + rows["failures"] >= args.images and queued == 0

    elapsed = timed_crawl(farm, r, "s3://faults/", done, kills)
    rows = count_rows(db_url)
    result = {
        "elapsed_s": elapsed,
        "captioned": distinct_captioned(db_url),
        "caption_rows": rows["captions"],
        "dead_letters": rows["failures"],
        "kills": len(farm.kills),
        "idle": sum(k.idle for k in farm.kills),
        "recoveries": [k.recovered_s for k in farm.kills if k.recovered_s is not None],
        "held": sum(1 for k in farm.kills if k.jobs),
        "kill_list": list(farm.kills),
    }
    clear(db_url)
    r.delete(env["CAPWORKS_QUEUE_NAME"])
    return result


def main() -> None:
    """Both runs, then the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--bare", action="store_true", help="no supervisor: lease expiry alone")
    args = parser.parse_args()
    ensure_checkpoint("shapes", get_settings().checkpoint_dir)
    with scratch_database() as db_url, scratch_s3() as endpoint:
        connect(db_url).dispose()
        make_bucket(endpoint, "faults", args.images, seed=900)
        calm = run(args, db_url, endpoint, 0)
        rough = run(args, db_url, endpoint, args.kills)
    mode = "bare workers (lease expiry)" if args.bare else "supervised (hand-back)"
    print(f"{args.images} images, {args.procs} worker processes, {mode}, default lease settings")
    print(
        "| run | kills (idle) | captioned | caption rows | dead letters | lost | time s "
        "| recover p50 s | max s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in (("no kills", calm), ("kills", rough)):
        lost = args.images - res["captioned"] - res["dead_letters"]
        recs = res["recoveries"]
        p50 = f"{statistics.median(recs):.1f}" if recs else "-"
        top = f"{max(recs):.1f}" if recs else "-"
        print(
            f"| {name} | {res['kills']} ({res['idle']}) | {res['captioned']} "
            f"| {res['caption_rows']} | {res['dead_letters']} | {lost} "
            f"| {res['elapsed_s']:.1f} | {p50} | {top} |"
        )
    print(f"time with kills / without: {rough['elapsed_s'] / calm['elapsed_s']:.2f} (goal <= 1.5)")
    print(
        f"kills of a process holding jobs: {rough['held']}; recovered: {len(rough['recoveries'])}"
    )
    kills = rough["kill_list"]
    first = min((k.at for k in kills), default=0.0)
    for k in kills:
        # Another kill before this one's jobs came back (a slower recovery's usual cause).
        end = k.at + (k.recovered_s or 0.0)
        overlapping = sum(1 for o in kills if o is not k and k.at < o.at < end)
        recovered = f"{k.recovered_s:.1f} s" if k.recovered_s is not None else "-"
        print(
            f"  kill at +{k.at - first:.0f} s: pid {k.pid}, {len(k.jobs)} jobs held, "
            f"first of them committed after {recovered}, {overlapping} kills meanwhile"
        )


if __name__ == "__main__":
    main()
