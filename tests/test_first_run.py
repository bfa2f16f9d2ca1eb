"""A newcomer's first distributed run, through the real command line (issue 23, items 1 and 2):
`enqueue` of a local folder says what the workers need, a worker with no file roots says so once,
its dead letters name the setting, `worker --file-root/--model/--db` reach the worker processes,
and a hub id that cannot resolve offline fails at once with the whole message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, png_bytes, run_cli
from pipeline_support import (
    REDIS_URL,
    Pipeline,
    captions,
    failures,
    own_queue,
    query,
    wait_until,
)
from sqlalchemy import select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.tables import Failure

HUB_ID = "damo/ofa_image-caption_coco_distilled_en"


def write_images(folder: Path, count: int, seed: int) -> list[str]:
    """`count` shapes images in `folder`; their paths."""
    folder.mkdir(parents=True)
    for i, (img, _) in enumerate(sample_scenes(count, seed)):
        (folder / f"img{i}.png").write_bytes(png_bytes(img))
    return sorted(str(p) for p in folder.iterdir())


def closed_port() -> int:
    """A loopback port nothing listens on (a hub that refuses every connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def farm(tmp_path: Path, shapes_dir: Path) -> Iterator[Pipeline]:
    """A queue of its own, a SQLite database, and no file roots in the environment."""
    with own_queue(f"sqlite:///{tmp_path / 'env.db'}", tmp_path) as p:
        p.extra_env["CAPWORKS_FILE_ROOTS"] = ""
        yield p


def start_supervisor(p: Pipeline, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`capworks worker --gpus cpu ...` as a user starts it, output to `log`."""
    exe = Path(sys.executable).parent / "capworks"
    env = {**p.env, "CAPWORKS_METRICS_PORT": "0"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(exe), "worker", "--gpus", "cpu", "--concurrency", "2", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_enqueue_of_a_local_folder_says_what_the_workers_need(farm: Pipeline) -> None:
    photos = farm.tmp / "photos"
    write_images(photos, 2, seed=3)
    result = farm.cli("enqueue", str(photos), "--no-progress")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "CAPWORKS_FILE_ROOTS" in line]
    assert len(notes) == 1, result.stderr
    assert f"--file-root {photos}" in notes[0]
    # Workers started with this host's settings would read the folder: nothing to say.
    farm.extra_env["CAPWORKS_FILE_ROOTS"] = str(farm.tmp)
    again = farm.cli("enqueue", str(photos), "--no-progress", "--force")
    assert again.returncode == 0, again.stderr
    assert "CAPWORKS_FILE_ROOTS" not in again.stderr


def test_a_worker_without_roots_says_so_once_and_its_dead_letters_name_the_setting(
    farm: Pipeline,
) -> None:
    photos = write_images(farm.tmp / "photos", 3, seed=4)
    # --model and --db win over the environment's (a hub id no worker here could load).
    db = f"sqlite:///{farm.tmp / 'cli.db'}"
    farm.extra_env["CAPWORKS_MODEL"] = HUB_ID
    assert (
        farm.cli("enqueue", str(farm.tmp / "photos"), "--model", "shapes", "--db", db).returncode
        == 0
    )
    log = farm.tmp / "worker.log"
    worker = start_supervisor(farm, log, "--model", "shapes", "--db", db)
    try:
        wait_until(lambda: len(failures(db)) == 3, 240, "3 dead letters", log.read_text)
    finally:
        stop(worker)
    assert failures(db) == dict.fromkeys(photos, "forbidden_path")
    messages = query(db, lambda c: list(c.scalars(select(Failure.message))))
    assert all("CAPWORKS_FILE_ROOTS" in m and "--file-root" in m for m in messages), messages
    said = [line for line in log.read_text().splitlines() if "no file roots" in line]
    assert len(said) == 1, log.read_text()


def test_worker_file_root_model_and_db_options_reach_the_worker_processes(
    farm: Pipeline,
) -> None:
    photos = write_images(farm.tmp / "photos", 3, seed=5)
    db = f"sqlite:///{farm.tmp / 'cli.db'}"
    farm.extra_env["CAPWORKS_MODEL"] = HUB_ID  # the options must win over these
    assert (
        farm.cli("enqueue", str(farm.tmp / "photos"), "--model", "shapes", "--db", db).returncode
        == 0
    )
    log = farm.tmp / "worker.log"
    worker = start_supervisor(
        farm, log, "--model", "shapes", "--db", db, "--file-root", str(farm.tmp / "photos")
    )
    try:
        wait_until(lambda: len(captions(db)) == 3, 240, "3 captions", log.read_text)
    finally:
        stop(worker)
    assert sorted(captions(db)) == photos
    assert failures(db) == {}
    assert "no file roots" not in log.read_text()
    assert not (farm.tmp / "env.db").exists()  # CAPWORKS_DATABASE_URL's database: never used


def test_worker_help_says_which_setting_each_option_sets() -> None:
    result = run_cli("worker", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option, variable in (
        ("--model", "CAPWORKS_MODEL"),
        ("--revision", "CAPWORKS_REVISION"),
        ("--db", "CAPWORKS_DATABASE_URL"),
        ("--file-root", "CAPWORKS_FILE_ROOTS"),
    ):
        assert option in text and variable in text, (option, text)


def test_a_bad_file_root_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    result = run_cli("worker", "--gpus", "cpu", "--file-root", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"capworks: error: --file-root {tmp_path / 'missing'}: no such file or directory"
    )
    assert "Traceback" not in result.stderr


def hub_offline_env(tmp_path: Path) -> dict[str, str]:
    """A hub that refuses connections, on loopback, and empty ModelScope and capworks caches."""
    return {
        "MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "MODELSCOPE_CACHE": str(tmp_path / "modelscope"),
        "CAPWORKS_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "CAPWORKS_BROKER_URL": REDIS_URL,
    }


@pytest.mark.parametrize("command", ["enqueue", "worker", "caption"])
def test_a_hub_id_that_cannot_resolve_fails_at_once_whole_with_the_offline_names(
    tmp_path: Path, command: str
) -> None:
    image = write_images(tmp_path / "photos", 1, seed=6)[0]
    args = {
        "enqueue": ["enqueue", str(tmp_path / "photos"), "--model", HUB_ID],
        "worker": ["worker", "--gpus", "cpu", "--model", HUB_ID],
        "caption": ["caption", image, "--model", HUB_ID, "--no-progress"],
    }[command]
    result = run_cli(*args, env=hub_offline_env(tmp_path), timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    said = next(i for i, line in enumerate(lines) if "ModelScope hub id" in line)
    error = lines[-1]
    assert said < len(lines) - 1, "the lookup is announced before it fails"
    assert error.startswith("capworks: error: cannot fetch"), result.stderr
    assert "cannot be reached" in error and "Connection refused" in error
    assert "shapes, tiny-random" in error
    assert error.endswith("merges.txt"), "the message is whole"
    assert "Traceback" not in result.stderr


def test_caption_with_a_model_that_does_not_load_leaves_no_database(tmp_path: Path) -> None:
    image = write_images(tmp_path / "photos", 1, seed=7)[0]
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    exe = Path(sys.executable).parent / "capworks"
    env = {k: v for k, v in os.environ.items() if k != "CAPWORKS_DATABASE_URL"}
    result = subprocess.run(
        [str(exe), "caption", image, "--model", str(empty), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "is not an OFA checkpoint" in result.stderr
    assert not (tmp_path / "capworks.db").exists()
