"""`capworks worker` argument handling, its restart policy, and its shutdown: no process it
started outlives it (the supervised Celery run itself is in test_pipeline.py)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from capworks.commands.worker import (
    KILLED_DELAY_S,
    MAX_RESTART_DELAY_S,
    RESTART_DELAY_S,
    STABLE_S,
    CeleryLauncher,
    Child,
    parse_gpus,
    plan_processes,
    worker_env,
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


def test_cpu_processes_share_the_cores_evenly() -> None:
    cores = len(os.sched_getaffinity(0))
    assert plan_processes("cpu", None) == ([None], 0)
    assert plan_processes("cpu", 1) == ([None], cores)
    if cores >= 2:
        assert plan_processes("cpu", 2) == ([None, None], cores // 2)
    with pytest.raises(ValueError, match="needs --gpus cpu"):
        plan_processes("0,1", 2)
    with pytest.raises(ValueError, match="more than this machine"):
        plan_processes("cpu", cores + 1)


def test_each_cpu_process_gets_its_threads_name_and_metrics_port() -> None:
    env = worker_env({}, None, 1, 9750)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "",
        "CAPWORKS_DEVICE": "cpu",
        "CAPWORKS_METRICS_PORT": "9751",
    }
    assert worker_env({}, "3", 0, 0) == {"CUDA_VISIBLE_DEVICES": "3", "CAPWORKS_DEVICE": "cuda:0"}
    cmd, env = CeleryLauncher(2, threads_per_process=1).command(None, 1, "inst-1")
    assert cmd[cmd.index("--hostname") + 1] == "cpu1@%h"
    assert (env["CAPWORKS_TORCH_THREADS"], env["CAPWORKS_DECODE_THREADS"]) == ("1", "1")


def test_cpu_procs_with_a_gpu_list_is_one_line_and_a_non_zero_exit() -> None:
    result = run_cli("worker", "--gpus", "0", "--cpu-procs", "2")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["capworks: error: --cpu-procs needs --gpus cpu"]


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


def test_a_process_sigkilled_young_is_restarted_half_a_second_later() -> None:
    # The OOM killer or a fault test, not a crash loop: backing off would only idle a slot.
    child = Child(None, subprocess.Popen(["sleep", "30"]), started_s=100.0, delay_s=16.0)
    child.proc.kill()
    code = child.proc.wait()
    assert code == -signal.SIGKILL
    assert child.next_delay(now_s=child.started_s + 1, code=code) == KILLED_DELAY_S
    assert child.next_delay(now_s=child.started_s + 1, code=1) == 32


STAND_IN_SUPERVISOR = Path(__file__).parent / "wrappers" / "stand_in_supervisor.py"


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def started_pids(pids: Path) -> list[int]:
    return [int(line) for line in pids.read_text().split()] if pids.exists() else []


def supervise_stand_ins(pids: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(STAND_IN_SUPERVISOR), "--pids", str(pids), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def stop_and_survivors(supervisor: subprocess.Popen[str], pids: Path) -> tuple[str, list[int]]:
    """What the supervisor said when `supervise` returned ("" if it did not within 20 s) and
    the processes it started that are still alive; everything left is killed afterwards."""
    try:
        said, _ = supervisor.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        said = ""
    survivors = [pid for pid in started_pids(pids) if alive(pid)]
    if supervisor.poll() is None:
        supervisor.kill()
        supervisor.communicate()
    for pid in survivors:  # processes this test started, through the supervisor
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return said.strip(), survivors


def test_sigterm_during_a_restart_stops_the_process_just_started(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The first process exits at once; the supervisor is signalled while starting the second.
    supervisor = supervise_stand_ins(pids, "--exit-first", "1", "--signal-self-at", "2")
    said, survivors = stop_and_survivors(supervisor, pids)
    assert len(started_pids(pids)) == 2
    assert survivors == [] and said == "supervisor returned 0"
    assert supervisor.returncode == 0


@pytest.mark.parametrize("seed", range(4))
def test_sigterms_sent_around_restarts_leave_no_child_alive(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    pids = tmp_path / "pids"
    # Four slots whose processes mostly exit at once, so restarts are under way all the time.
    supervisor = supervise_stand_ins(
        pids, "--slots", "4", "--live-share", "0.3", "--seed", str(seed)
    )
    deadline = time.monotonic() + 20
    while not started_pids(pids) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.2))
    for _ in range(3):
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0, 0.03))
    said, survivors = stop_and_survivors(supervisor, pids)
    assert survivors == [] and said == "supervisor returned 0", f"{len(started_pids(pids))} started"
