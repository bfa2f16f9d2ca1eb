"""`capworks demo`: the main job on embedded defaults, with nothing to download.

Builds the `shapes` checkpoint if missing, renders sample images from its synthetic world into a
folder, captions them into a SQLite file and prints the results as a table.
"""

from __future__ import annotations

from pathlib import Path

from capworks.checkpoints.shapes_world import sample_scenes

DEMO_SEED = 2026


def write_samples(folder: Path, count: int) -> None:
    """Render `count` sample images as PNG files named after their true caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(sample_scenes(count, DEMO_SEED)):
        img.save(folder / f"{i:03d} {caption}.png")


def run_demo(folder: str, count: int) -> int:
    """Caption `count` generated images with the shapes model into `<folder>/captions.db`."""
    from capworks.commands.caption import CaptionRequest, run_caption

    root = Path(folder)
    images = root / "images"
    write_samples(images, count)
    db = f"sqlite:///{(root / 'captions.db').resolve()}"
    status = run_caption(CaptionRequest((str(images),), db, "shapes", batch_size=8))
    print(f"captions saved in {root / 'captions.db'}; file names carry the true captions")
    return status
