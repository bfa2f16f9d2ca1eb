"""`--help` as a newcomer reads it (issue 23 item 15): every option with a default shows it,
every command ends with an example, and a default taken from a secret-bearing setting is masked;
`capworks checkpoint list` says which offline checkpoints are built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conftest import run_cli

from capworks.cli import build_parser
from capworks.cli_help import shown_default, shows_default


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_shows_its_defaults_and_an_example() -> None:
    for name, parser in commands().items():
        done = run_cli(name, "--help", timeout=120)
        assert done.returncode == 0, (name, done.stderr)
        assert f"example:\n  capworks {name}" in done.stdout, name
        flat = " ".join(done.stdout.split())
        for action in parser._actions:
            if shows_default(action):
                shown = " ".join(f"(default: {shown_default(action.default)})".split())
                assert shown in flat, (name, action.option_strings, flat)
    enqueue = " ".join(run_cli("enqueue", "--help").stdout.split())
    assert "--list-streams N list an s3:// source" in enqueue
    assert "(default: 1)" in enqueue  # --list-streams


def test_a_default_from_a_secret_setting_is_masked_in_help() -> None:
    env = {"CAPWORKS_DATABASE_URL": "postgresql+psycopg://u:hunter2-in-help@db/captions"}
    done = run_cli("caption", "--help", env=env)
    assert done.returncode == 0, done.stderr
    assert "hunter2-in-help" not in done.stdout
    assert "postgresql+psycopg://u:***@db/captions" in " ".join(done.stdout.split())


def test_checkpoint_list_names_each_offline_checkpoint_built_or_not(tmp_path: Path) -> None:
    built = tmp_path / "checkpoints" / "shapes"
    built.mkdir(parents=True)
    (built / "build.json").write_text(json.dumps({"name": "shapes", "held_out_exact": 0.985}))
    done = run_cli("checkpoint", "list", env={"CAPWORKS_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == f"shapes\tbuilt\t{built}\theld-out exact 98.5%"
    assert lines[2].startswith("tiny-random\tnot built\tcapworks checkpoint build tiny-random")
    assert len(lines) == 5


def test_every_option_has_help_and_worker_options_name_the_setting_they_default_to() -> None:
    for name, parser in commands().items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._SubParsersAction):
                # Without either, argparse prints the option's bare name and nothing else.
                assert action.help or shows_default(action), (name, action.option_strings)
    env = {
        "CAPWORKS_PREFETCH_JOBS": "7",
        "CAPWORKS_REVISION": "v1.0.1",
        "CAPWORKS_DATABASE_URL": "postgresql+psycopg://u:hunter2-in-help@db/captions",
    }
    done = run_cli("worker", "--help", env=env)
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    assert "(default: CAPWORKS_PREFETCH_JOBS, now 7)" in flat
    assert "sets CAPWORKS_REVISION (now v1.0.1)" in flat
    assert "(now postgresql+psycopg://u:***@db/captions)" in flat
    assert "hunter2-in-help" not in flat
    assert "(default: one process using every core)" in flat
