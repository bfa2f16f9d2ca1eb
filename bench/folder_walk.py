"""Folder crawl listing: the streaming walk against the old whole-tree sort, in one run.
Goals (issue 25, item 1): first job <= 1 s, peak RSS growth <= 50 MiB, a resume near the end
<= 1 s, on 1,000,000 files.

    .venv/bin/python bench/folder_walk.py [--files 1000000] [--per-folder 1000] [--dir /dev/shm]

Makes `--files` empty `.jpg` files in folders of `--per-folder` (a tmpfs by default, so the
disk is not what is measured), then lists them through `iter_positions` (what `capworks enqueue
FOLDER` reads: a stat and a reference per file) and through a copy of the old `iter_local`
(`rglob`, then a sort of every path, then a stat per file). Each measurement runs in a child
process of its own so that peak RSS is its alone: time to the first reference, to the first
job's page (1,000 references), to the end, and the peak RSS growth over the process before the
listing; then the same for a resume from the path 1,000 files before the end. The tree is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from child_rss import peak_growth_bytes, rss_bytes, run_in_child

from capworks.producer.crawl import PAGE_SIZE
from capworks.producer.sources import IMAGE_SUFFIXES, iter_positions, local_position, local_ref
from capworks.schema.uris import ImageRef, file_uri


def old_iter_local(path: Path, start_after: str | None = None) -> Iterator[ImageRef]:
    """`producer.sources.iter_local` as it was before the streaming walk (commit 840c8b9)."""
    files = sorted(
        file_uri(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    for uri in files:
        if start_after is None or uri > start_after:
            yield local_ref(Path(uri))


def old_positions(source: str, start_after: str | None) -> Iterator[tuple[str, ImageRef]]:
    for ref in old_iter_local(Path(source), start_after):
        yield local_position(ref.uri), ref


def new_positions(source: str, start_after: str | None) -> Iterator[tuple[str, ImageRef]]:
    return iter_positions(source, None, start_after)


WALKS = {"old": old_positions, "new": new_positions}


def measure(walk: str, root: str, start_after: str | None) -> dict[str, Any]:
    """List the tree once (in a child of its own): the times and peak RSS growth."""
    base = rss_bytes()
    started = time.perf_counter()
    first = page = None
    count = 0
    for _position, _ref in WALKS[walk](root, start_after):
        count += 1
        if count == 1:
            first = time.perf_counter() - started
        if count == PAGE_SIZE:
            page = time.perf_counter() - started
    total = time.perf_counter() - started
    return {
        "first_s": first,
        "page_s": page,
        "total_s": total,
        "count": count,
        "rss": peak_growth_bytes(base),
    }


def make_tree(root: Path, files: int, per_folder: int) -> None:
    for n in range(0, files, per_folder):
        folder = root / f"{n // per_folder:05d}"
        folder.mkdir(parents=True)
        for i in range(n, min(n + per_folder, files)):
            (folder / f"IMG_{i:07d}.jpg").touch()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capworks-walk-", dir=args.dir))
    try:
        started = time.perf_counter()
        make_tree(work / "tree", args.files, args.per_folder)
        print(f"made {args.files:,} files in {time.perf_counter() - started:.1f} s under {work}")
        root = str((work / "tree").resolve())
        last_folder = sorted(os.listdir(root))[-1]
        names = sorted(os.listdir(os.path.join(root, last_folder)))
        near_end = os.path.join(root, last_folder, names[0])  # ~per_folder files before the end
        rows = {}
        for case, position in (("from the start", None), ("resume near the end", near_end)):
            for walk in ("old", "new"):
                rows[(case, walk)] = r = run_in_child(measure, walk, root, position)
                print(
                    f"{case:20s} {walk}: first ref {r['first_s']:.3f} s, first job "
                    f"({PAGE_SIZE:,} refs) {r['page_s'] or float('nan'):.3f} s, all "
                    f"{r['count']:,} in {r['total_s']:.1f} s, peak RSS +{r['rss'] / 2**20:.1f} MiB"
                )
        for case in ("from the start", "resume near the end"):
            old, new = rows[(case, "old")], rows[(case, "new")]
            when = "page_s" if new["page_s"] else "first_s"  # a resume's last page is short
            print(
                f"{case}: first job {old[when] / new[when]:.0f}x sooner, "
                f"peak RSS growth {old['rss'] / max(new['rss'], 1):.1f}x smaller, "
                f"whole listing {old['total_s'] / new['total_s']:.2f}x the old speed"
            )
        print(json.dumps({f"{c} / {w}": r for (c, w), r in rows.items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
