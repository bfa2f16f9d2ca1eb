"""`capworks worker` argument handling and its restart policy (the supervised run itself is in
test_pipeline.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import run_cli

from capworks.commands.worker import (
    MAX_RESTART_DELAY_S,
    RESTART_DELAY_S,
    STABLE_S,
    Child,
    parse_gpus,
)


def test_gpu_lists() -> None:
    assert parse_gpus("cpu") == [None]
    assert parse_gpus("0,1,1") == ["0", "1"]
    with pytest.raises(ValueError, match="--gpus takes all, cpu or a list"):
        parse_gpus("0,banana")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
def test_all_gpus_without_a_gpu_says_so() -> None:
    with pytest.raises(ValueError, match="use --gpus cpu"):
        parse_gpus("all")


def test_a_bad_gpu_list_is_one_line_and_a_non_zero_exit() -> None:
    result = run_cli("worker", "--gpus", "banana")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "capworks: error: --gpus takes all, cpu or a list like 0,1; got 'banana'"
    ]


def test_a_process_that_dies_young_is_restarted_later_and_later() -> None:
    child = Child(None, subprocess.Popen(["true"]), started_s=100.0)
    child.proc.wait()
    delays = []
    for _ in range(8):
        child.delay_s = child.next_delay(now_s=child.started_s + 1)
        delays.append(child.delay_s)
    assert delays == [4, 8, 16, 32, 60, 60, 60, 60]
    assert delays[-1] == MAX_RESTART_DELAY_S
    assert child.next_delay(now_s=child.started_s + STABLE_S) == RESTART_DELAY_S
