"""The streaming folder walk (`producer/walk.py`): the order of a sort of the whole tree's paths,
references yielded while the tree is still being walked, a resume that skips whole folders,
and rglob's suffix and symlink rules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from capworks.producer import imagenames
from capworks.producer.sources import IMAGE_SUFFIXES, iter_local, iter_positions, local_position
from capworks.schema.uris import file_uri

# Names chosen where a per-folder sort by bare name and a sort of whole paths disagree:
# "a" < "a.png" < "a b" by name, but "/r/a b/..." < "/r/a.png" < "/r/a/..." as paths.
TREE = [
    "a/x.png",
    "a/deeper/y.JPG",
    "a.png",
    "a b/x.png",
    "a-/z.webp",
    "ab.png",
    "b/.png",  # no suffix in pathlib's eyes: not an image
    "b/notes.txt",
    "b/c/d/e.gif",
    "Z.png",
    "z/last.tiff",
]


def make_tree(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def rglob_order(root: Path) -> list[str]:
    """What `iter_local` listed before the streaming walk: every image path, sorted."""
    return sorted(
        file_uri(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


@pytest.fixture()
def listed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The folders `os.scandir` is asked to list (the real call, recorded)."""
    calls: list[str] = []
    real = os.scandir

    def recording(path: str) -> os.ScandirIterator[str]:  # type: ignore[name-defined]
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", recording)
    yield calls


def test_the_walk_yields_the_order_of_a_sort_of_the_whole_trees_paths(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "r", TREE)
    uris = [ref.uri for ref in iter_local(root)]
    assert uris == rglob_order(root)
    assert len(uris) == 9  # .png alone and notes.txt are not images


def test_files_are_yielded_as_the_walk_goes_not_after_listing_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "r", ["a/1.png", "m/1.png", "z/1.png"])
    refs = iter_local(root)
    assert next(refs).uri == str(root.resolve() / "a/1.png")
    # A file added to a folder the walk has not reached yet is found: nothing was listed ahead.
    (root / "z/0.png").write_bytes(b"x")
    assert [ref.uri for ref in refs] == [
        str(root.resolve() / name) for name in ("m/1.png", "z/0.png", "z/1.png")
    ]


def test_a_resume_lists_only_the_folders_on_the_way_to_the_position_and_after_it(
    tmp_path: Path, listed: list[str]
) -> None:
    root = make_tree(tmp_path / "r", [f"{d}/{f}.png" for d in "abcdef" for f in range(3)]).resolve()
    position = str(root / "d/1.png")
    rest = [ref.uri for ref in iter_local(root, start_after=position)]
    assert rest == [str(root / name) for name in ("d/2.png", "e/0.png", "e/1.png", "e/2.png")] + [
        str(root / f"f/{f}.png") for f in range(3)
    ]
    assert listed == [str(root), str(root / "d"), str(root / "e"), str(root / "f")]


def test_a_resume_inside_a_nested_folder_skips_its_earlier_siblings_and_their_subtrees(
    tmp_path: Path, listed: list[str]
) -> None:
    root = make_tree(tmp_path / "r", TREE).resolve()
    every = rglob_order(root)
    for n, position in enumerate(every):
        listed.clear()
        assert [ref.uri for ref in iter_local(root, start_after=position)] == every[n + 1 :]
    # Resuming after a/deeper/y.JPG: "a b", "a-" and a.png sort before a/ and are not listed.
    listed.clear()
    list(iter_local(root, start_after=str(root / "a/deeper/y.JPG")))
    assert str(root / "a b") not in listed and str(root / "a-") not in listed
    assert str(root / "a/deeper") in listed


def test_a_symlinked_file_counts_under_its_target_and_a_symlinked_folder_is_not_followed(
    tmp_path: Path,
) -> None:
    root = make_tree(tmp_path / "r", ["a.png", "m.png"])
    elsewhere = make_tree(tmp_path / "elsewhere", ["far.png", "sub/deep.png"])
    (root / "b-link.png").symlink_to(elsewhere / "far.png")
    (root / "folder-link").symlink_to(elsewhere / "sub", target_is_directory=True)
    (root / "broken.png").symlink_to(tmp_path / "missing.png")
    positions = [(pos, ref.uri) for pos, ref in iter_positions(str(root), None, None)]
    real = root.resolve()
    assert positions == [
        (str(real / "a.png"), str(real / "a.png")),
        # Ordered and resumed by the link's path, named by where the bytes are.
        (str(real / "b-link.png"), str(elsewhere.resolve() / "far.png")),
        (str(real / "m.png"), str(real / "m.png")),
    ]
    resumed = [ref.uri for _, ref in iter_positions(str(root), None, str(real / "b-link.png"))]
    assert resumed == [str(real / "m.png")]


def test_a_root_named_through_a_symlink_is_walked_under_its_real_path(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "r", ["x/1.png"])
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    assert [ref.uri for ref in iter_local(tmp_path / "alias")] == [str(root / "x/1.png")]


def test_a_resume_after_a_name_that_is_not_utf8_goes_on_from_it(tmp_path: Path) -> None:
    root = (tmp_path / "r").resolve()
    root.mkdir()
    for name in (b"a.png", b"caf\xe9.png", b"d/e.png", b"z.png"):
        if b"/" in name:
            os.makedirs(os.fsencode(root) + b"/d", exist_ok=True)
        with open(os.fsencode(root) + b"/" + name, "wb") as f:
            f.write(b"x")
    every = list(iter_positions(str(root), None, None))
    bad = every[1][0]
    assert bad.startswith("bytes:")  # the position the database can hold
    resumed = [ref.uri for _, ref in iter_positions(str(root), None, bad)]
    assert resumed == [str(root / "d/e.png"), str(root / "z.png")]
    assert local_position(str(root / "z.png")) == str(root / "z.png")


def test_the_walk_reads_file_sizes_and_change_tags_as_it_finds_them(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "r", ["a.png"])
    (root / "a.png").write_bytes(b"12345")
    (ref,) = iter_local(root)
    st = (root / "a.png").stat()
    assert (ref.size_bytes, ref.etag) == (5, f"{5:x}-{st.st_mtime_ns:x}")


def test_pathlib_suffix_rules_are_kept() -> None:
    assert [imagenames.suffix_of(n) for n in ("a.png", ".png", "a.", "..png", "a.b.JPG", "a")] == [
        ".png",
        "",
        "",
        ".png",
        ".JPG",
        "",
    ]
