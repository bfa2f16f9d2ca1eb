"""The synthetic image world of the `shapes` checkpoint: two coloured squares and their relation.

Captions read "a red square above a blue square" or "a red square left of a blue square".
Six colours, ordered pairs of different colours and two relations give 60 distinct captions,
so a caption written against the wrong image is caught by a test. The language is built on what
a small OFA model learns in minutes on two CPU cores (colour and position); shape identity from
a randomly initialised ResNet trains far slower (see shared notes).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
RELATIONS = ("above", "left of")
IMAGE_PX = 128


@dataclass(frozen=True)
class Scene:
    """One synthetic image's content."""

    first: str
    second: str
    relation: str

    @property
    def caption(self) -> str:
        """The caption the `shapes` checkpoint is trained to produce for this scene."""
        return f"a {self.first} square {self.relation} a {self.second} square"


def all_scenes() -> list[Scene]:
    """Every scene the world can produce, in a fixed order."""
    pairs = itertools.permutations(COLOURS, 2)
    return [Scene(a, b, r) for (a, b), r in itertools.product(pairs, RELATIONS)]


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw a scene with random sizes, positions, tints and noise."""
    grey = rng.randint(100, 156)
    img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    size = rng.randint(34, 50)
    half = IMAGE_PX // 2
    # The first square sits in the top (or left) half, the second in the other half.
    along = [rng.randint(2, half - size - 2), rng.randint(half + 2, IMAGE_PX - size - 2)]
    across = [rng.randint(4, IMAGE_PX - size - 4) for _ in range(2)]
    for colour, a, c in zip((scene.first, scene.second), along, across, strict=True):
        rgb = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[colour])
        x, y = (c, a) if scene.relation == "above" else (a, c)
        draw.rectangle((x, y, x + size, y + size), fill=rgb)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (IMAGE_PX, IMAGE_PX, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def sample_scenes(count: int, seed: int) -> list[tuple[Image.Image, str]]:
    """Draw `count` (image, caption) pairs deterministically from `seed`."""
    rng = random.Random(seed)
    scenes = all_scenes()
    out = []
    for _ in range(count):
        scene = rng.choice(scenes)
        out.append((render_scene(scene, rng), scene.caption))
    return out
