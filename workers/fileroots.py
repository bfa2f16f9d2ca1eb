"""Local image files only from under configured roots. A path is opened one component at a time
from its root with `O_NOFOLLOW`, so neither `..`, nor a symlink, nor a path swapped for one
between check and open, takes a read outside; a file with more than one hard link is refused
(its other names may lie anywhere)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from capworks.schema.errors import Code, StorageError

# Every component is opened this way: a symlink fails with ELOOP instead of being followed, and a
# FIFO opens without waiting for a writer.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# How an operator lets workers read a folder; every refusal of a path outside the roots says it.
HOW_TO_OPEN = "add the folder to CAPWORKS_FILE_ROOTS or give `capworks worker --file-root DIR`"


class FileRoots:
    """The folders (or single files) local paths may be read from; none refuses every path."""

    def __init__(self, roots: Iterable[Path]) -> None:
        # The roots' own symlinks are the operator's choice, so they are resolved once here.
        self._roots = frozenset(Path(r).resolve() for r in roots)

    def read(self, path: Path, max_bytes: int) -> bytes:
        """At most `max_bytes + 1` bytes of the regular file at `path`, or `StorageError`:
        `forbidden_path` outside the roots, `not_found`, `access_denied`, `bad_uri`."""
        if ".." in path.parts:
            raise StorageError(Code.FORBIDDEN_PATH, f"{path}: `..` is not allowed in a path")
        path = Path(os.path.abspath(path))
        root = next((p for p in (path, *path.parents) if p in self._roots), None)
        if root is None:
            raise StorageError(Code.FORBIDDEN_PATH, f"{path}: {self._outside()}")
        fd = open_beneath(root, path.relative_to(root).parts, path)
        try:
            check_regular(os.fstat(fd), path)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes + 1)

    def covers(self, path: Path) -> bool:
        """Whether `path` lies under a root (by name: a symlink inside is still refused)."""
        path = Path(os.path.abspath(path))
        return any(p in self._roots for p in (path, *path.parents))

    def _outside(self) -> str:
        """Why a path outside the roots is refused, naming the setting that opens it: a worker
        started with none refuses every local path, and its operator must learn how to open
        one from the dead letter alone."""
        if not self._roots:
            return f"not under any file root (none configured: {HOW_TO_OPEN})"
        return f"not under the file roots ({HOW_TO_OPEN})"


def check_regular(st: os.stat_result, path: Path) -> None:
    """Raise unless `st` is a regular file with one name."""
    if stat.S_ISDIR(st.st_mode):
        raise StorageError(Code.BAD_URI, f"is a directory: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(Code.BAD_URI, f"not a regular file: {path}")
    if st.st_nlink > 1:
        raise StorageError(Code.FORBIDDEN_PATH, f"{path}: has {st.st_nlink} hard links")


def open_beneath(root: Path, parts: tuple[str, ...], path: Path) -> int:
    """A descriptor of `root/parts...`, each component opened relative to the one before and
    none of them a symlink; `path` names the whole in errors."""
    fd = _open(str(root), None, path)
    for part in parts:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(Code.NOT_FOUND, f"no such file: {path}")
        try:
            child = _open(part, fd, path)
        finally:
            os.close(fd)
        fd = child
    return fd


def _open(name: str, dir_fd: int | None, path: Path) -> int:
    try:
        return os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(Code.FORBIDDEN_PATH, f"{path}: {name!r} is a symlink") from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise StorageError(Code.NOT_FOUND, f"no such file: {path}") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise StorageError(Code.ACCESS_DENIED, f"permission denied: {path}") from exc
        raise StorageError(Code.STORAGE_UNAVAILABLE, f"{path}: {exc.strerror}") from exc
