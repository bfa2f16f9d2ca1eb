"""A streaming walk of a local folder: depth first with `os.scandir`, each directory's entries
sorted, references yielded as the walk goes, resumable from a path.

The order is the order of the paths as strings: a folder's entries are sorted by their name with
a `/` after each subfolder's name, which puts `a.png` (`.` < `/`) before the files of `a/`, as a
sort of the whole tree's paths would. The same key decides which subfolders a resume skips
whole, so walking and comparing can never disagree. Memory holds one sorted listing per level
of the path being walked, never the tree.

The rules of the old `rglob` listing are kept: files are picked by the image suffix policy
(`producer/imagenames.py`), or all of them for a crawl, which judges names itself and counts
what it skips; a symlink to a file counts and is named by its target (the workers' file roots
decide whether it may be read), a symlink to a folder is not followed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capworks.producer.imagenames import is_image_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One name of a listed folder, with what the walk needs to know of it."""

    name: str
    is_dir: bool  # a real folder (not a symlink to one): walked into

    @property
    def sort_key(self) -> str:
        """The name as it sorts among whole paths: a folder's with the `/` its files carry."""
        return self.name + "/" if self.is_dir else self.name


@dataclass(frozen=True)
class WalkedFile:
    """A file the walk found: its walked path (the resume position) and its canonical path."""

    path: str  # the root's resolved path joined with the names walked: ordered, resumable
    target: str  # where it is: `path`, or a symlink's resolved target
    stat: os.stat_result  # of the target, taken as the file was found


def walk_files(
    root: Path, suffixes: frozenset[str] | None, start_after: str | None = None
) -> Iterator[WalkedFile]:
    """The files under `root` (resolved) named as images by `suffixes` (every file for None),
    in path order, after `start_after` (a path from an earlier walk) when given."""
    yield from _walk(str(root.resolve()), suffixes, start_after)


def _walk(
    folder: str, suffixes: frozenset[str] | None, start_after: str | None
) -> Iterator[WalkedFile]:
    for entry in _listing(folder):
        path = os.path.join(folder, entry.name)
        if entry.is_dir:
            if start_after is not None and _before(path + "/", start_after):
                continue  # everything under it sorts before the resume position
            yield from _walk(path, suffixes, start_after)
        elif start_after is not None and path <= start_after:
            continue
        elif suffixes is None or is_image_name(entry.name, suffixes):
            found = _regular_file(path)
            if found is not None:
                yield WalkedFile(path, _target(path), found)


def _regular_file(path: str) -> os.stat_result | None:
    """The stat of a regular file (through a symlink); None for anything else or a name gone
    since its folder was listed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _before(folder_prefix: str, start_after: str) -> bool:
    """True when every path under a folder (`folder_prefix` ends in `/`) sorts at or before
    `start_after`: the prefix is smaller and the position is not inside that folder."""
    return folder_prefix < start_after and not start_after.startswith(folder_prefix)


def _listing(folder: str) -> list[Entry]:
    """A folder's entries in walk order; an unreadable folder is logged and walked as empty
    (rglob gave up on the whole tree at the first one, silently)."""
    try:
        with os.scandir(folder) as it:
            entries = [Entry(e.name, _is_real_dir(e)) for e in it]
    except OSError as exc:
        log.warning("cannot list %s: %s (skipped)", folder, exc.strerror or exc)
        return []
    entries.sort(key=lambda e: e.sort_key)
    return entries


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _target(path: str) -> str:
    """The canonical path of a file under a resolved root: itself, unless it is a symlink
    (resolving every file would cost a system call per path component)."""
    return str(Path(path).resolve()) if os.path.islink(path) else path
