"""capworks is one installed package: the top-level folders schema/, workers/ and producer/ are
installed as capworks.schema, capworks.workers and capworks.producer (`schema` is also a PyPI
package, which a top-level install of ours would shadow)."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("schema", "producer", "workers")
# An import of a folder by its top-level name, or a Celery app named by one.
TOP_LEVEL = re.compile(
    r"^\s*(from|import)\s+(schema|workers|producer)\b|-A (schema|workers|producer)\.", re.M
)


def tracked_python() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [REPO / line for line in listed.stdout.splitlines()]


@pytest.mark.parametrize("name", FOLDERS)
def test_each_folder_is_a_subpackage_of_capworks(name: str) -> None:
    module = importlib.import_module(f"capworks.{name}")
    assert Path(module.__file__).resolve().parent == REPO / name  # type: ignore[arg-type]


def test_nothing_imports_a_folder_by_its_top_level_name() -> None:
    """In the repository the folders are also importable as `schema` etc. (the working directory is
    on sys.path): one such import would load a second copy of a module beside capworks' own."""
    offenders = [
        f"{path.relative_to(REPO)}: {match.group(0).strip()}"
        for path in tracked_python()
        for match in TOP_LEVEL.finditer(path.read_text())
    ]
    assert offenders == []


@pytest.mark.slow
def test_the_wheel_installs_beside_pypis_schema(tmp_path: Path) -> None:
    """Built as a user builds it, the wheel holds every module of the three folders under
    capworks/ and no top-level package but capworks, so PyPI's `schema` (a dev dependency, here
    from the venv) still imports beside it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("capworks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"capworks"}
    wanted = {
        f"capworks/{p.relative_to(REPO)}"
        for folder in FOLDERS
        for p in (REPO / folder).rglob("*.py")
    }
    assert wanted - names == set()
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import schema, capworks, capworks.cli, capworks.schema.db, capworks.workers.tasks, "
        "capworks.producer.crawl\n"
        "print(schema.Schema(int).validate(3), capworks.__file__, capworks.schema.db.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    shown = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    number, ours, db = shown.stdout.split()
    assert number == "3"
    assert ours == str(site / "capworks" / "__init__.py")
    assert db == str(site / "capworks" / "schema" / "db.py")


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
        for pkg in (*FOLDERS, "capworks")
        for p in (REPO / pkg).rglob("*.py")
        if any(r in p.read_text() for r in reads) and p not in outside
    ]
    assert offenders == []
