"""Local image paths only from under the file roots: `..`, absolute paths elsewhere, symlinks
and hard links that leave a root are refused with `forbidden_path`; files inside are read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capworks.schema.errors import Code, StorageError
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef
from capworks.workers.fetch import StoreFetcher
from capworks.workers.fileroots import FileRoots

LIMIT_BYTES = 1024


@pytest.fixture()
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A root holding `inside/cat.png`, and a secret file beside the root."""
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "inside" / "cat.png").write_bytes(b"cat bytes")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for jobs")
    return root, secret


def refusal(roots: FileRoots, path: Path | str) -> StorageError:
    with pytest.raises(StorageError) as info:
        roots.read(Path(path), LIMIT_BYTES)
    return info.value


def test_a_file_inside_a_root_is_read(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    assert FileRoots([root]).read(root / "inside" / "cat.png", LIMIT_BYTES) == b"cat bytes"


def test_a_path_outside_every_root_is_forbidden(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    assert refusal(FileRoots([root]), secret).code is Code.FORBIDDEN_PATH
    assert refusal(FileRoots([root]), "/etc/hostname").code is Code.FORBIDDEN_PATH


def test_dot_dot_escapes_are_forbidden_even_when_they_land_inside(
    layout: tuple[Path, Path],
) -> None:
    root, secret = layout
    roots = FileRoots([root])
    assert refusal(roots, f"{root}/inside/../../{secret.name}").code is Code.FORBIDDEN_PATH
    assert refusal(roots, f"{root}/inside/../inside/cat.png").code is Code.FORBIDDEN_PATH


def test_a_symlink_inside_a_root_pointing_out_is_forbidden(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    (root / "inside" / "link.png").symlink_to(secret)
    (root / "elsewhere").symlink_to(secret.parent, target_is_directory=True)
    roots = FileRoots([root])
    assert refusal(roots, root / "inside" / "link.png").code is Code.FORBIDDEN_PATH
    assert refusal(roots, root / "elsewhere" / secret.name).code is Code.FORBIDDEN_PATH


def test_a_hard_link_is_forbidden(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    os.link(secret, root / "inside" / "hard.png")
    error = refusal(FileRoots([root]), root / "inside" / "hard.png")
    assert error.code is Code.FORBIDDEN_PATH and "hard links" in error.message


def test_a_worker_with_no_roots_refuses_every_local_path(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    fetcher = StoreFetcher.from_settings(Settings(file_roots=()), None)
    with pytest.raises(StorageError) as info:
        fetcher.fetch(ImageRef(str(root / "inside" / "cat.png")))
    assert info.value.code is Code.FORBIDDEN_PATH and "none configured" in info.value.message


def test_the_configured_roots_reach_the_fetcher(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, secret = layout
    monkeypatch.setenv("CAPWORKS_FILE_ROOTS", f"/nonexistent{os.pathsep}{root}")
    fetcher = StoreFetcher.from_settings(Settings(), None)
    assert fetcher.fetch(ImageRef(f"file://{root}/inside/cat.png")) == b"cat bytes"
    with pytest.raises(StorageError) as info:
        fetcher.fetch(ImageRef(str(secret)))
    assert info.value.code is Code.FORBIDDEN_PATH


def test_missing_files_and_folders_keep_their_codes(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    roots = FileRoots([root])
    assert refusal(roots, root / "inside" / "gone.png").code is Code.NOT_FOUND
    assert refusal(roots, root / "inside" / "cat.png" / "x").code is Code.NOT_FOUND
    assert refusal(roots, root / "inside").code is Code.BAD_URI


def test_a_root_named_through_a_symlink_or_as_one_file_still_reads(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    root, secret = layout
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)  # the operator's own link
    via_alias = FileRoots([tmp_path / "alias"])
    assert via_alias.read(root / "inside" / "cat.png", LIMIT_BYTES) == b"cat bytes"
    one_file = FileRoots([root / "inside" / "cat.png"])  # `capworks caption cat.png`
    assert one_file.read(root / "inside" / "cat.png", LIMIT_BYTES) == b"cat bytes"
    assert refusal(one_file, secret).code is Code.FORBIDDEN_PATH
