"""`capworks demo`: the main job on embedded defaults, with nothing to download.

Builds the `shapes` checkpoint if missing, renders sample images from its synthetic world into a
folder, captions them into a SQLite file and prints the results as a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.cli import build_parser

DEMO_SEED = 2026


def write_samples(folder: Path, count: int) -> None:
    """Render `count` sample images as PNG files named after their true caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(sample_scenes(count, DEMO_SEED)):
        img.save(folder / f"{i:03d} {caption}.png")


def run_demo(args: argparse.Namespace) -> int:
    """Caption generated images with the shapes model into `<dir>/captions.db`."""
    from capworks.commands.caption import run_caption

    root = Path(args.dir)
    images = root / "images"
    write_samples(images, args.count)
    db = f"sqlite:///{(root / 'captions.db').resolve()}"
    caption_args = build_parser().parse_args(
        ["caption", str(images), "--model", "shapes", "--db", db, "--batch-size", "8"]
    )
    status = run_caption(caption_args)
    print(f"captions saved in {root / 'captions.db'}; file names carry the true captions")
    return status
