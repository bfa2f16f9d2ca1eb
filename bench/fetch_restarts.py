"""Messages lost by a Redis fetch while the server restarts under its consumer: stock kombu
(BRPOP, then the unacknowledged record in a second command) against capworks's reliable fetch
(BLMOVE into a fetching list, then one atomic claim), in one run.

    .venv/bin/python bench/fetch_restarts.py [--messages 40000] [--restarts 20] [--runs 2]

Each run starts a redis-server of its own on a loopback port (append-only, fsync always),
publishes the messages, and consumes them with one kombu consumer (acknowledging each) while the
server is stopped and started `--restarts` times at random moments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fetch_storm import RELIABLE, STOCK, restart_storm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    print("| run | fetch | messages | restarts | reconnects | lost | delivered twice | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for run in range(args.runs):
        for name, transport in (
            ("stock kombu (BRPOP)", STOCK),
            ("capworks (BLMOVE + claim)", RELIABLE),
        ):
            started = time.monotonic()
            data = Path(tempfile.mkdtemp(prefix="capworks-storm-"))
            r = restart_storm(transport, data, args.messages, args.restarts, seed=run)
            twice = r.deliveries - len(r.delivered)
            print(
                f"| {run + 1} | {name} | {r.published} | {r.restarts} | {r.reconnects} | "
                f"{r.lost} | {twice} | {time.monotonic() - started:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
