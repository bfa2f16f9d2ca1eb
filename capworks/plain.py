"""Outside values (keys, URIs, captions, messages, host names) as terminal text that shows them
and does nothing else: Rich markup stays literal (`photos/[/b].jpg`, `[link=...]`) and control
characters are escaped (`\\x1b`), whatever an uploader put in a name."""

from __future__ import annotations

from rich.text import Text

from capworks.schema.redact import escape_controls


def plain(value: object, style: str = "") -> Text:
    """`value` as Rich text that is never parsed as markup, its control characters escaped."""
    return Text(escape_controls(str(value)), style=style)


def plain_line(value: object) -> str:
    """`value` as one line for `print`: control characters (newlines too) escaped."""
    return escape_controls(str(value))


def counted(count: int, one: str, many: str | None = None) -> str:
    """`count` with its noun in the right number: "1 try", "5 tries", "2 dead letters"."""
    return f"{count} {one if count == 1 else many or one + 's'}"
