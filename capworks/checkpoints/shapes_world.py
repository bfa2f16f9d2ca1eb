"""The synthetic image world of the `shapes` checkpoint: a coloured square on a coloured ground.

Captions read "a red square on a blue background". Six colours for the square and the five
others for the background give 30 distinct captions, so a caption written against the wrong
image is caught by a test. The language is built on what a small OFA model learns in minutes on
two CPU cores (colours, told apart by the area they cover); telling shapes apart from a randomly
initialised ResNet, or binding colours to positions, trains far slower (see shared notes).
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
IMAGE_PX = 128


@dataclass(frozen=True)
class Scene:
    """One synthetic image's content."""

    colour: str
    background: str

    @property
    def caption(self) -> str:
        """The caption the `shapes` checkpoint is trained to produce for this scene."""
        return f"a {self.colour} square on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene the world can produce, in a fixed order."""
    return [Scene(a, b) for a, b in itertools.permutations(COLOURS, 2)]


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, v + rng.randint(-15, 15))) for v in rgb)
    return r, g, b


def render_scene(
    scene: Scene, rng: random.Random, palette: dict[str, tuple[int, int, int]] = COLOURS
) -> Image.Image:
    """Draw a scene with a random square size and position, tints and noise (`palette`: the
    colours by name; a shifted world brings colours of its own)."""
    img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), _jitter(palette[scene.background], rng))
    size = rng.randint(48, 84)
    x, y = rng.randint(0, IMAGE_PX - size), rng.randint(0, IMAGE_PX - size)
    ImageDraw.Draw(img).rectangle(
        (x, y, x + size, y + size), fill=_jitter(palette[scene.colour], rng)
    )
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (IMAGE_PX, IMAGE_PX, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def sample_scenes(count: int, seed: int) -> list[tuple[Image.Image, str]]:
    """Draw `count` (image, caption) pairs deterministically from `seed`."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test scenes, not secrets
    scenes = all_scenes()
    out = []
    for _ in range(count):
        scene = rng.choice(scenes)
        out.append((render_scene(scene, rng), scene.caption))
    return out
