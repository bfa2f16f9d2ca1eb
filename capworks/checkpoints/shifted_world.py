"""A shifted `shapes` world for fine-tuning, made only of words `shapes` never saw: squares
AND backgrounds in four new colours ("a purple square on a grey background").

Every word that tells one shifted caption from another is new, so the base checkpoint, which
names one of its own six colours for each, shares nothing but the template with the references
("a", "square", "on a", "background": in every caption, hence weightless under CIDEr-D's
document frequencies). Its CIDEr-D here is about nil; a fine-tune that learns the new words
raises it, and the original world's held-out set shows what the fine-tune made it forget. The
new colours sit far from the original six (grey between black and white, cyan between green
and blue, purple, pink), so learning them need not move the old ones.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from PIL import Image

from capworks.checkpoints.shapes_world import COLOURS, Scene, render_scene

SHIFTED_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (130, 40, 180),
    "pink": (250, 150, 200),
    "grey": (128, 128, 128),
    "cyan": (20, 210, 220),
}
PALETTE = {**COLOURS, **SHIFTED_COLOURS}


def shifted_scenes() -> list[Scene]:
    """Every scene of the shifted world: a new colour on another new colour (12)."""
    return [Scene(a, b) for a, b in itertools.permutations(SHIFTED_COLOURS, 2)]


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
