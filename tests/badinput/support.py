"""What both bad-input tests share: reading each case's outcome back from SQL and checking it
against the table, and running a command without root's power to read any file."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from pipeline_support import query
from sqlalchemy import select

from badinput.cases import CAPTION, CASES, Case
from capworks.schema.tables import BadMessage, Caption, Failure, Image

# Root reads a file of mode 000 anyway: to see "access denied" the command under test runs
# without the two capabilities that let it (it is still uid 0, so everything else is as before).
NO_DAC_OVERRIDE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def unprivileged() -> list[str]:
    """The prefix that makes a command honour file modes: nothing unless running as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:  # pragma: no cover - util-linux is everywhere here
        raise RuntimeError("running as root without setpriv: cannot make a file unreadable")
    return list(NO_DAC_OVERRIDE)


@dataclass(frozen=True)
class Seen:
    """One image's rows: its caption or its dead letter, and the dimensions recorded."""

    caption: str | None
    code: str | None
    message: str | None
    width_px: int | None
    height_px: int | None


def read_outcomes(db_url: str) -> dict[str, Seen]:
    """URI -> what the database holds for it."""
    stmt = (
        select(Image.uri, Caption.text, Failure.code, Failure.message, Image.width_px)
        .add_columns(Image.height_px)
        .outerjoin(Caption, Caption.image_id == Image.id)
        .outerjoin(Failure, Failure.image_id == Image.id)
    )
    rows = query(db_url, lambda conn: conn.execute(stmt).all())
    return {uri: Seen(*rest) for uri, *rest in rows}


def bad_message_reasons(db_url: str) -> list[str]:
    """The reason of every `bad_messages` row."""
    return query(db_url, lambda conn: list(conn.scalars(select(BadMessage.reason))))  # type: ignore[no-any-return]


def mismatches(
    uri_of: dict[str, str], seen: dict[str, Seen], same_bytes: dict[str, str]
) -> list[str]:
    """Every way the outcomes differ from the table (empty when they all match).

    `same_bytes` is the caption the engine gives each caption case's bytes in the test process:
    the mode under test must give exactly that, and the true caption where the case has one."""
    problems = []
    for case in CASES:
        got = seen.get(uri_of[case.kind])
        problem = _mismatch(case, got, same_bytes.get(case.kind))
        if problem:
            problems.append(f"{case.kind}: {problem}")
    return problems


def _mismatch(case: Case, got: Seen | None, same_bytes: str | None) -> str | None:
    if got is None:
        return "no row at all"
    if got.caption is not None and got.code is not None:
        return f"both a caption and a dead letter ({got.code})"
    if case.expect != CAPTION:
        if got.code != case.expect:
            return f"expected {case.expect}, got {got.code or 'a caption'} ({got.message})"
        return None
    if got.caption is None:
        return f"expected a caption, got {got.code}: {got.message}"
    if got.caption != same_bytes:
        return f"caption {got.caption!r} is not the engine's {same_bytes!r} for the same bytes"
    if case.truth is not None and got.caption != case.truth:
        return f"caption {got.caption!r} is not the true {case.truth!r}"
    if case.upright_px is not None and (got.width_px, got.height_px) != case.upright_px:
        return f"recorded {got.width_px}x{got.height_px}, upright is {case.upright_px}"
    return None


def outcome_table(uri_of: dict[str, str], seen: dict[str, Seen]) -> str:
    """kind -> outcome lines, for the test log."""
    lines = []
    for case in CASES:
        got = seen.get(uri_of[case.kind])
        what = "missing" if got is None else (got.code or f"caption {got.caption!r}")
        lines.append(f"{case.kind:34s} expected {case.expect:18s} got {what}")
    return "\n".join(lines)
