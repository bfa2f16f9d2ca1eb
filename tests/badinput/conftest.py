"""Fixtures of the bad-input suite: the cases' bytes, made once per session, and the caption the
engine gives each caption case's bytes in this process."""

from __future__ import annotations

from typing import Any

import pytest

from badinput.cases import CAPTION, CASES


@pytest.fixture(scope="session")
def case_blobs() -> dict[str, bytes]:
    """kind -> the bytes of that case (generated here, never checked in)."""
    return {case.kind: case.make() for case in CASES}


@pytest.fixture(scope="session")
def same_bytes_captions(case_blobs: dict[str, bytes], shapes_engine: Any) -> dict[str, str]:
    """kind -> the caption the shapes engine gives the case's bytes in this process."""
    kinds = [c.kind for c in CASES if c.expect == CAPTION and c.placement == "stored"]
    results = shapes_engine.caption_images([case_blobs[k] for k in kinds])
    return {k: r.caption.text for k, r in zip(kinds, results, strict=True)}
