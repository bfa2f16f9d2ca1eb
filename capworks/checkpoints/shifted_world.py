"""A shifted `shapes` world for fine-tuning: squares in colours `shapes` never saw, with words
of their own ("a purple square on a white background"), on the original backgrounds.

The base checkpoint gets the background right and the square's colour wrong, so its CIDEr-D
here is low but not nil; a fine-tune that learns the new words raises it, and the original
world's held-out set shows what the fine-tune made it forget.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from capworks.checkpoints.shapes_world import COLOURS, Scene, render_scene

SHIFTED_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (130, 40, 180),
    "orange": (250, 140, 20),
    "pink": (250, 150, 200),
}
PALETTE = {**COLOURS, **SHIFTED_COLOURS}


def shifted_scenes() -> list[Scene]:
    """Every scene of the shifted world: a new colour on an original background (18)."""
    return [Scene(square, ground) for square in SHIFTED_COLOURS for ground in COLOURS]


def sample_shifted(count: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs of the shifted world, drawn deterministically from `seed`."""
    rng = random.Random(seed)  # noqa: S311 - reproducible scenes, not secrets
    scenes = shifted_scenes()
    out = []
    for _ in range(count):
        scene = rng.choice(scenes)
        out.append((render_scene(scene, rng, PALETTE), scene.caption))
    return out


def write_references(folder: Path, pairs: list[tuple[Image.Image, str]], name: str) -> Path:
    """Save the images as PNGs under `folder` and their captions as `<name>.jsonl` (relative
    `uri`s, as `capworks eval` and `capworks finetune` read them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(pairs):
        image.save(folder / f"{name}-{i:05d}.png")
        rows.append(json.dumps({"uri": f"{name}-{i:05d}.png", "caption": caption}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path
