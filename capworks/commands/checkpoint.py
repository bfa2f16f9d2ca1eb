"""`capworks checkpoint list`: the offline checkpoints, built (where, and how well `shapes`
captions its held-out images) or not yet (and the command that builds one)."""

from __future__ import annotations

import json
from pathlib import Path

from capworks.schema.checkpoint import OFFLINE_NAMES


def checkpoint_lines(cache: Path) -> list[str]:
    """One line per offline checkpoint name, in the order `--model` lists them."""
    lines = []
    for name in OFFLINE_NAMES:
        folder = cache / name
        record = folder / "build.json"
        if not record.is_file():
            lines.append(f"{name}\tnot built\tcapworks checkpoint build {name} (or first use)")
            continue
        built = json.loads(record.read_text())
        exact = built.get("held_out_exact")
        about = f"held-out exact {exact:.1%}" if isinstance(exact, float) else "random weights"
        lines.append(f"{name}\tbuilt\t{folder}\t{about}")
    return lines


def run_checkpoint_list(cache: Path) -> int:
    """Print the offline checkpoints and where the cache keeps them."""
    print(f"cache: {cache} (CAPWORKS_CACHE_DIR moves it)")
    for line in checkpoint_lines(cache):
        print(line)
    return 0
