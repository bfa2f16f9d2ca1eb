r"""Time `shapes` builds of several training recipes side by side, on the same load.

Each recipe trains in its own process with one torch thread, started together, so a busy
machine slows all of them alike: the ratio to the first (old) recipe is the figure, the absolute
seconds are this machine's at this load. Each build is checked like a published one (held-out
exact with the real generator) but written to a temporary folder, never to the cache.

    .venv/bin/python bench/shapes_build.py --recipe 96,500,3e-4,40,50,fp32 \
        --recipe 80,400,3e-4,40,50

A recipe trains in bfloat16 autocast where the CPU has bf16 units unless it ends in `,fp32`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_one(spec: str) -> None:
    """Train one recipe (px,max_steps,lr,warmup,check_every[,bf16|fp32]), check it, print one
    JSON line."""
    from capworks.checkpoints.build import held_out_exact
    from capworks.checkpoints.layout import write_checkpoint
    from capworks.checkpoints.train_shapes import Recipe, train_shapes

    px, steps, lr, warmup, every, *precision = spec.split(",")
    bf16 = precision != ["fp32"]
    recipe = Recipe(int(px), 16, int(steps), float(lr), int(warmup), int(every), bf16)
    started = time.monotonic()
    model, metrics = train_shapes(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(model, Path(tmp), recipe.patch_px)
        exact = held_out_exact(Path(tmp))
    total_s = round(time.monotonic() - started, 1)
    print(json.dumps({"recipe": spec, "total_s": total_s, "held_out_exact": exact, **metrics}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe", action="append", required=True, help="px,steps,lr,warmup,every[,bf16|fp32]"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        build_one(args.one)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--recipe", spec, "--one", spec],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for spec in args.recipe
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"a build failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"load average at end: {os.getloadavg()}")
    base = results[0]["total_s"]
    for r in results:
        print(
            f"{r['recipe']:>22}: {r['total_s']:7.1f} s ({r['total_s'] / base:.2f}x the first), "
            f"{r['steps']} steps, held-out exact {r['held_out_exact']:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
