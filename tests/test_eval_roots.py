"""`capworks eval` reads images only from under the references' folder or `--images-root`
(issue 22, item 10): an absolute name, a `file://` URI or a `..` component is refused, one line
per row and counted, and the other rows are scored; `--allow-outside-root` takes them as before.
With `--caption`, a symlink under the root is not followed either."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import png_bytes, run_cli
from sqlalchemy.orm import Session

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.cli import main
from capworks.references import read_references
from capworks.schema.db import connect
from capworks.schema.tables import Caption, Image

OUTSIDE_NAMES = ["../outside/secret.png", "/etc/hostname", "file:///etc/hostname", "sub/../b.png"]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "caption"])
        writer.writerows(rows)
    return path


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    """`set/` (the references' folder, with a.png) beside `outside/secret.png`."""
    (tmp_path / "set").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "set" / "a.png").write_bytes(b"a")
    (tmp_path / "outside" / "secret.png").write_bytes(b"secret")
    return tmp_path / "set"


def test_names_leaving_the_root_are_refused_one_row_each_and_the_rest_read(layout: Path) -> None:
    rows = [("a.png", "a cat"), *[(name, "a dog") for name in OUTSIDE_NAMES]]
    rows += [("s3://bucket/k.png", "a bus"), ("https://img.example/x.png", "a car")]
    loaded = read_references(write_csv(layout / "refs.csv", rows))
    assert list(loaded.refs) == [
        str(layout.resolve() / "a.png"),
        "s3://bucket/k.png",  # not a file of this host
        "https://img.example/x.png",  # fetched through the address guard
    ]
    assert [row.name for row in loaded.refused] == OUTSIDE_NAMES
    assert [row.where for row in loaded.refused] == [
        f"{layout / 'refs.csv'}:{n}" for n in (3, 4, 5, 6)
    ]
    assert "`..`" in loaded.refused[0].reason and "absolute" in loaded.refused[1].reason
    assert loaded.local_root == layout.resolve()


def test_a_coco_image_outside_the_root_is_refused_with_its_captions(layout: Path) -> None:
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "../outside/secret.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a cat"},
            {"image_id": 2, "caption": "a dog"},
            {"image_id": 2, "caption": "a dog again"},
        ],
    }
    (layout / "refs.json").write_text(json.dumps(coco))
    loaded = read_references(layout / "refs.json")
    assert loaded.refs == {str(layout.resolve() / "a.png"): ["a cat"]}
    assert [(r.where, r.name) for r in loaded.refused] == [
        (f"{layout / 'refs.json'}: images[1]", "../outside/secret.png")
    ]


def test_an_images_root_elsewhere_confines_names_the_same_way(layout: Path) -> None:
    refs = write_csv(layout / "refs.csv", [("a.png", "a cat"), ("../x.png", "a dog")])
    under_s3 = read_references(refs, images_root="s3://bucket/set/")
    assert list(under_s3.refs) == ["s3://bucket/set/a.png"] and len(under_s3.refused) == 1
    assert under_s3.local_root is None


def test_allow_outside_root_takes_every_name_as_before(layout: Path) -> None:
    rows = [("a.png", "a cat"), ("../outside/secret.png", "a dog"), ("/etc/hostname", "a host")]
    loaded = read_references(write_csv(layout / "refs.csv", rows), allow_outside_root=True)
    assert list(loaded.refs) == [
        str(layout.resolve() / "a.png"),
        str((layout.parent / "outside" / "secret.png").resolve()),
        "/etc/hostname",
    ]
    assert loaded.refused == []


def store_caption(db_url: str, uri: str, text: str) -> None:
    with Session(connect(db_url)) as session:
        image = Image(uri=uri)
        session.add(image)
        session.flush()
        session.add(
            Caption(
                image_id=image.id, model_id="m", revision="", settings_hash="aaaa", settings={},
                text=text, score=-0.5, alternatives=[], tags={},
            )
        )  # fmt: skip
        session.commit()


def run_eval(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["eval", *args, "--no-progress", "--no-meteor", "--tokenizer", "simple"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_one_line_per_refused_row_and_counts_them(
    layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_url = f"sqlite:///{layout.parent / 'c.db'}"
    store_caption(db_url, str(layout.resolve() / "a.png"), "a cat on a mat")
    rows = [("a.png", "a cat on a mat"), *[(name, "a dog") for name in OUTSIDE_NAMES]]
    refs = write_csv(layout / "refs.csv", rows)
    code, out, err = run_eval(str(refs), "--db", db_url, "--model", "m", "--json", capsys=capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == len(OUTSIDE_NAMES) and all(
        line.startswith("capworks: refused ") for line in lines
    )
    report: dict[str, Any] = json.loads(out)
    assert report["images_scored"] == 1
    assert [row["name"] for row in report["refused"]] == OUTSIDE_NAMES
    code, out, err = run_eval(str(refs), "--db", db_url, "--model", "m", capsys=capsys)
    assert code == 0 and "4 reference rows refused" in out


def test_references_with_every_row_refused_are_one_line_and_exit_1(layout: Path) -> None:
    refs = write_csv(layout / "refs.csv", [("/etc/hostname", "a host"), ("../x.png", "x")])
    done = run_cli("eval", str(refs), "--db", f"sqlite:///{layout / 'c.db'}", "--model", "m")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no reference captions (2 rows refused" in done.stderr


@pytest.mark.slow
def test_caption_reads_nothing_outside_the_root_and_follows_no_symlink(
    tmp_path: Path, shapes_dir: Path
) -> None:
    scenes = sample_scenes(3, seed=31)
    root, outside = tmp_path / "set", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside.png").write_bytes(png_bytes(scenes[0][0]))
    (outside / "secret.png").write_bytes(png_bytes(scenes[1][0]))
    os.symlink(outside / "secret.png", root / "link.png")
    rows = [("inside.png", scenes[0][1]), ("../outside/secret.png", scenes[1][1])]
    rows += [(str(outside / "secret.png"), scenes[1][1]), ("link.png", scenes[1][1])]
    refs = write_csv(root / "refs.csv", rows)
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    args = ["eval", str(refs), "--caption", "--model", "shapes", "--db", db_url, "--device", "cpu"]
    done = run_cli(*args, "--json", "--no-meteor", "--tokenizer", "simple", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["images_scored"] == 1 and len(report["refused"]) == 2
    assert [m["uri"] for m in report["not_scored"]] == [str(root.resolve() / "link.png")]
    assert report["not_scored"][0]["reason"].startswith("forbidden_path")
    with connect(db_url).connect() as conn:
        stored = [
            row[0] for row in conn.execute(Image.__table__.select().with_only_columns(Image.uri))
        ]
    assert not [uri for uri in stored if "secret" in uri]  # the outside file was never captioned
    allowed = run_cli(*args, "--json", "--no-meteor", "--tokenizer", "simple", "--no-progress",
                      "--allow-outside-root")  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads(allowed.stdout)["images_scored"] == 2  # inside.png and secret.png, as before
