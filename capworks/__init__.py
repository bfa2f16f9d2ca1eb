"""capworks: caption image libraries with OFA: the command line, offline checkpoint tooling, and
the Python API (`Captioner`, `enqueue`), imported on first use so that `import capworks` and the
command line stay light."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capworks.api import Captioner, CaptionResult, enqueue

__all__ = ["CaptionResult", "Captioner", "enqueue"]


def __getattr__(name: str) -> Any:
    """The API's names, from `capworks.api` (which loads torch's neighbours) on first use."""
    if name in __all__:
        from capworks import api

        return getattr(api, name)
    raise AttributeError(f"module 'capworks' has no attribute {name!r}")
