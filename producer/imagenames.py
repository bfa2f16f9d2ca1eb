"""Which listed names are images: one suffix policy for local folders, bucket listings,
inventories and storage events.

A name is an image when the suffix of its last part (pathlib's rule: from the last dot, unless
the dot leads or ends the name, so `.png` alone has none) is one of the image suffixes, compared
in lower case (`IMG_1.JPG` is an image, `photo.jpg.bak` is not). `--suffix` replaces the set.
Sources that name each image themselves (a URI list, a table, a file given by path) are not
judged by name: a URL such as `https://host/render?id=17` has no suffix at all.
"""

from __future__ import annotations

from collections.abc import Iterable

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}
)


def suffix_of(name: str) -> str:
    """pathlib's suffix of a file name: from its last dot, unless the dot leads or ends it."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def is_image_name(path_or_key: str, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> bool:
    """True when the last part of a path, key or URI has one of `suffixes` (any case)."""
    return suffix_of(path_or_key.rsplit("/", 1)[-1]).lower() in suffixes


def suffix_set(values: Iterable[str]) -> frozenset[str]:
    """`--suffix` values as the policy compares them: lower case, with their leading dot."""
    return frozenset("." + v.lower().lstrip(".") for v in values if v.strip("."))
