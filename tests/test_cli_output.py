"""The CLI's output tells the truth wherever it goes: a caption table names each image by the
part of its path that differs, a pipe gets plain lines, a reader that leaves early (`| head`)
costs no traceback, `status --watch` writes into a pipe, and a caption run with failed images
exits 3 (issue 23, item 11).

Renderers are checked in-process; the commands run as subprocesses on the real PostgreSQL and
Redis (and the real `shapes` model for `caption`)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from capworks.commands.caption import print_results
from capworks.output import EXIT_BROKEN_PIPE, EXIT_SOME_FAILED, distinguishing_names
from capworks.schema.errors import Code, ImageError
from capworks.schema.uris import ImageRef
from capworks.workers.engine import Alternative, Caption, CaptionedImage
from capworks.workers.outcome import Outcome

EXE = str(Path(sys.executable).parent / "capworks")
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('CAPWORKS_TEST_REDIS_DB', '15')}"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TerminalBuffer(io.StringIO):
    """A text buffer that says it is a terminal, as a person's stdout does."""

    def isatty(self) -> bool:
        return True


def outcomes(folder: str) -> list[Outcome[CaptionedImage]]:
    made: list[Outcome[CaptionedImage]] = []
    for n in range(3):
        caption = Caption(f"a red square {n}", -0.5, (Alternative("a square", -1.0),), (1,), ())
        made.append(
            Outcome(ImageRef(f"{folder}/part{n}/img{n}.png"), CaptionedImage(caption, 8, 8))
        )
    made.append(Outcome(ImageRef(f"{folder}/part9/bad.png"), ImageError(Code.UNDECODABLE, "no")))
    return made


def test_distinguishing_names_drop_the_shared_folders_only() -> None:
    assert distinguishing_names(["/h/p/a/1.png", "/h/p/b/2.png"]) == (
        "/h/p/",
        ["a/1.png", "b/2.png"],
    )
    assert distinguishing_names(["/h/p/img10.png", "/h/p/img11.png"]) == (
        "/h/p/",
        ["img10.png", "img11.png"],
    )
    assert distinguishing_names(["s3://b/x.jpg"]) == ("s3://b/", ["x.jpg"])
    assert distinguishing_names(["a.png", "b.png"]) == ("", ["a.png", "b.png"])
    assert distinguishing_names([]) == ("", [])


def test_the_caption_table_names_each_image_by_the_part_of_its_path_that_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    folder = "/home/someone/pictures/holidays-2026-summer-by-the-sea/photos"
    out = TerminalBuffer()
    print_results(outcomes(folder), as_json=False, out=out)
    shown = ANSI.sub("", out.getvalue())
    for name in ("part0/img0.png", "part1/img1.png", "part2/img2.png", "part9/bad.png"):
        assert name in shown, shown
    assert f"images under {folder}/\n" in shown
    assert "…" not in shown
    assert "3 captioned, 1 failed" in shown


def test_caption_results_into_a_pipe_are_one_plain_line_per_image(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    print_results(outcomes("/p"), as_json=False, out=out)
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    assert lines == [
        ["/p/part0/img0.png", "a red square 0", "-0.500", ""],
        ["/p/part1/img1.png", "a red square 1", "-0.500", ""],
        ["/p/part2/img2.png", "a red square 2", "-0.500", ""],
        ["/p/part9/bad.png", "error", "undecodable", "no"],
    ]
    assert capsys.readouterr().err == "3 captioned, 1 failed\n"


def run_into_a_closed_pipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI with stdout a pipe whose reader has already gone (`| head` that left)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [EXE, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


def test_a_reader_that_left_early_costs_no_traceback(tmp_path: Path) -> None:
    from test_search import outcome, write

    from capworks.schema.db import connect

    url = f"sqlite:///{tmp_path / 'c.db'}"
    write(connect(url), *(outcome(f"/p/{n}.png", f"a horse number {n}") for n in range(50)))
    code, err = run_into_a_closed_pipe("search", "horse", "--db", url, "--json")
    assert (code, err) == (EXIT_BROKEN_PIPE, "")


def test_status_watch_into_a_pipe_writes_a_snapshot_per_refresh(pg_url: str) -> None:
    queue = f"capworks-output-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CAPWORKS_BROKER_URL": REDIS_URL, "CAPWORKS_QUEUE_NAME": queue}
    watch = subprocess.Popen(
        [EXE, "status", "--watch", "--interval", "0.2s", "--db", pg_url],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert watch.stdout is not None
    try:
        snapshots, deadline = 0, time.monotonic() + 60
        while snapshots < 2:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([watch.stdout], [], [], max(left, 0))
            assert ready, "status --watch wrote no second snapshot into a pipe"
            line = watch.stdout.readline()
            assert line, "status --watch ended"
            snapshots += line.startswith("-- ")
            assert "\x1b" not in line
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(timeout=20)
    assert code == 0


@pytest.mark.slow
def test_a_caption_run_with_failed_images_exits_3_and_a_pipe_gets_plain_lines(
    shapes_dir: Any, tmp_path: Path
) -> None:
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "part0").mkdir(parents=True)
    for n in range(2):
        Image.new("RGB", (32, 32), (200, 30 * n, 30)).save(folder / "part0" / f"img{n}.png")
    (folder / "part0" / "broken.jpg").write_bytes(b"not an image")
    url = f"sqlite:///{tmp_path / 'c.db'}"
    common = ["--model", "shapes", "--db", url, "--no-progress"]
    done = subprocess.run(
        [EXE, "caption", str(folder), *common], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert sorted(row[0] for row in rows) == sorted(str(p) for p in folder.rglob("*.*"))
    assert [row[1:3] for row in rows if row[0].endswith("broken.jpg")] == [["error", "undecodable"]]
    assert "2 captioned, 1 failed" in done.stderr
    good = subprocess.run(
        [EXE, "caption", str(folder / "part0" / "img0.png"), *common, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0, good.stderr
    assert "caption" in json.loads(good.stdout)
    code, err = run_into_a_closed_pipe("caption", str(folder), *common, "--json")
    assert code == EXIT_BROKEN_PIPE and "Traceback" not in err and "BrokenPipe" not in err
