"""What the CLI prints and returns, for a person at a terminal and for a pipe alike.

A table is for a terminal; a pipe (`> file`, `| grep`) gets one plain line per row with whole
values. A reader that stops early (`| head`) is not an error worth a traceback. Exit codes:
0 done, 1 the command failed, 2 bad usage, 3 done but some images failed (their dead letters
are in the database), 130 interrupted, 141 the reader of stdout went away (as SIGPIPE).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

EXIT_SOME_FAILED = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by it


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (stdout by default) is a terminal a person reads."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a stand-in stream
        return False


def distinguishing_names(uris: Sequence[str]) -> tuple[str, list[str]]:
    """The folder prefix (ending in "/") that all `uris` share, and each one after it.

    Images of one folder differ in their ends: a table shows `part0/img3.png` under a title that
    names `/home/me/photos/`, where cutting each URI to its last characters left `…/photos/im…`.
    """
    if not uris:
        return "", []
    prefix = os.path.commonprefix(list(uris))
    prefix = prefix[: prefix.rfind("/") + 1]  # whole folders only
    if any(len(uri) == len(prefix) for uri in uris):  # a URI that is a folder itself
        prefix = prefix[: prefix.rstrip("/").rfind("/") + 1]
    return prefix, [uri[len(prefix) :] for uri in uris]


def silence_broken_pipe() -> None:
    """After stdout's reader went away: point stdout at /dev/null, so that the flush at exit
    does not raise again (Python's documented way)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout to redirect
        pass
    finally:
        os.close(devnull)
