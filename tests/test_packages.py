"""Our top-level package names are also names of unrelated PyPI packages: make sure ours load."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["schema", "producer", "workers", "capworks"])
def test_top_level_package_comes_from_this_repository(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name  # type: ignore[arg-type]


def test_producer_and_workers_never_import_each_other() -> None:
    for side, other in (("producer", "workers"), ("workers", "producer")):
        for path in (REPO / side).rglob("*.py"):
            text = path.read_text()
            assert f"from {other}" not in text and f"import {other}" not in text, path


def test_shipped_tokenizer_files_are_the_real_ofa_vocabulary() -> None:
    folder = REPO / "capworks" / "checkpoints" / "ofa_tokenizer"
    md5 = {
        n: hashlib.md5((folder / n).read_bytes(), usedforsecurity=False).hexdigest()
        for n in ("vocab.json", "merges.txt")
    }
    assert md5 == {
        "vocab.json": "be4d3c6f3f5495426b2c03b334334354",
        "merges.txt": "75a37753dd7a28a2c5df80c28bf06e4e",
    }


def test_only_settings_reads_the_environment() -> None:
    reads = ("os.environ[", "os.environ.get", "os.getenv")  # copying it for a child is fine
    # torchrun tells its processes their number in WORLD_SIZE: its contract, not a setting.
    outside = {REPO / "capworks" / "finetune" / "trainer.py"}
    offenders = [
        p
        for pkg in ("schema", "producer", "workers", "capworks")
        for p in (REPO / pkg).rglob("*.py")
        if any(r in p.read_text() for r in reads) and p not in outside
    ]
    assert offenders == []
