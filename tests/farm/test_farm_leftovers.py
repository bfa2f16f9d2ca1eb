"""The farm's clean-up removes what a crashed run left, and only that: on a shared machine a
farm whose owner still runs is another session's (tests/farm/hosts.py `remove_leftovers`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from farm.hosts import PREFIX, remove_leftovers, sh

pytestmark = [pytest.mark.serial]


def namespaces() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


def test_a_farm_whose_owner_runs_is_spared_and_removed_once_it_died() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    farm_id = f"{PREFIX}{uuid.uuid4().hex[:4]}"
    root = Path(tempfile.mkdtemp(prefix=f"{farm_id}-"))
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (root / "owner").write_text(str(owner.pid))
        sh("ip", "netns", "add", f"{farm_id}-sw")
        remove_leftovers()
        assert f"{farm_id}-sw" in namespaces() and root.exists(), "a live farm was removed"
        owner.kill()
        owner.wait()
        remove_leftovers()
        assert f"{farm_id}-sw" not in namespaces() and not root.exists(), "a leftover stayed"
    finally:
        owner.kill()
        owner.wait()
        remove_leftovers(farm_id)
