"""What `--help` shows beyond argparse's own: every option's default and one example per
command. Defaults are redacted: a database URL's password taken from the environment must not
reach a terminal's scrollback."""

from __future__ import annotations

import argparse
import copy
import textwrap
from collections.abc import Iterable

from capworks.schema.redact import redact

# One line a user can run (or adapt) for each command, in the README's words.
EXAMPLES = {
    "caption": "capworks caption photos/ --model shapes",
    "enqueue": "capworks enqueue s3://bucket/photos/ --list-streams 8",
    "worker": "capworks worker --gpus cpu --file-root $PWD/photos",
    "dlq": "capworks dlq list --code not_found",
    "events": "capworks events --source webhook --port 8750",
    "demo": "capworks demo --count 8",
    "search": 'capworks search "red -blue" --in caption,tags',
    "export": "capworks export captions.parquet --mark nightly",
    "status": "capworks status --watch --interval 5s",
    "health": "capworks health --worker",
    "eval": "capworks eval refs.jsonl --model shapes --caption",
    "finetune": "capworks finetune refs.jsonl --output models/ft --model shapes --epochs 1",
    "checkpoint": "capworks checkpoint list",
}


def shows_default(action: argparse.Action) -> bool:
    """True for an option whose default means something to print (not a flag's False, not
    None or an empty list, which mean "not given")."""
    default = action.default
    if not action.option_strings or default is argparse.SUPPRESS:
        return False
    if default is None or isinstance(default, bool) or default in ([], ()):
        return False
    return "default" not in (action.help or "")


def shown_default(default: object) -> str:
    """A default as `--help` prints it: sequences joined by commas, secrets masked."""
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    return redact(str(default))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout with `(default: ...)` after each option that has one, and the epilog
    (exit statuses, the example) kept as written."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):  # argparse prints no help line at all
            action = copy.copy(action)
            action.help = f"(default: {shown_default(action.default)})".replace("%", "%%")
        return super()._format_action(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never inside a hub id, a path or a URL: one that wraps at its hyphen cannot be copied.
        return textwrap.wrap(
            " ".join(text.split()), width, break_on_hyphens=False, break_long_words=False
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action):
            return text
        return f"{text} (default: {shown_default(action.default)})".strip().replace("%", "%%")


def add_examples(commands: Iterable[tuple[str, argparse.ArgumentParser]]) -> None:
    """Append each command's example to its epilog."""
    for name, parser in commands:
        example = f"example:\n  {EXAMPLES[name]}"
        parser.epilog = f"{parser.epilog}\n\n{example}" if parser.epilog else example
