"""`capworks caption`: the one-shot local mode, with no broker."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from capworks.models import resolve_model
from capworks.output import EXIT_SOME_FAILED, distinguishing_names, is_terminal
from capworks.plain import plain, plain_line
from capworks.producer.sources import InputError, iter_refs
from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.db import connect
from capworks.schema.redact import redact, redact_uri
from capworks.schema.settings import Settings, get_settings
from capworks.schema.storage import LazyS3Client
from capworks.schema.uris import ImageRef, is_http, is_s3
from capworks.workers.engine import CaptionedImage
from capworks.workers.fetch import StoreFetcher
from capworks.workers.guard import IPNetwork
from capworks.workers.imagepath import ImagePath
from capworks.workers.outcome import Outcome
from capworks.workers.persist import ResultWriter
from capworks.workers.pipeline import caption_refs
from capworks.workers.runtime import build_path

TABLE_ROWS = 50


class RateColumn(TextColumn):
    """Images per second."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:
        """The task's speed as images/s."""
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if not speed and task.finished and task.finished_time:  # too quick for rich's sampling
            speed = task.completed / task.finished_time
        return Text(f"{speed:.2f} img/s" if speed else "- img/s", style="progress.data.speed")


@dataclass(frozen=True)
class CaptionRequest:
    """What `capworks caption` was asked to do."""

    inputs: tuple[str, ...]
    db: str
    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    generator: str = "fast"
    batch_size: int = 8
    json: bool = False
    no_progress: bool = False
    # Networks http(s) inputs may reach besides public ones (`--allow-address`).
    allow: tuple[IPNetwork, ...] = ()


def run_caption(request: CaptionRequest) -> int:
    """Caption every image under the inputs into the database and print the results."""
    settings = get_settings()
    for item in request.inputs:
        if not is_s3(item) and not is_http(item) and not Path(item).exists():
            raise InputError(f"no such file or directory: {item}")
    # A server database is checked before the model loads (a bad URL fails in a second); a
    # SQLite file only once the model has loaded, so a model that cannot load leaves none.
    db = None if request.db.startswith("sqlite") else connect(request.db)
    config = resolve_model(request.model, request.revision, settings, say=say)
    # Built on the first s3:// reference (an input or a line of a URI list), never before.
    s3 = LazyS3Client(settings)
    refs = list(iter_refs(request.inputs, s3))
    model = ModelOptions(request.device, request.dtype, request.generator, request.batch_size)
    # A one-shot command reads the local paths it was given (and the configured roots), no more.
    roots = [Path(i) for i in request.inputs if not is_s3(i) and not is_http(i)]
    with one_shot_path(settings, config, s3, model, file_roots=roots, allow=request.allow) as path:
        db = db or connect(request.db)  # SQLite creates ./capworks.db on connect
        outcomes = caption_with_progress(refs, path, ResultWriter(db, config), request)
    print_results(outcomes, as_json=request.json)
    failed = any(not isinstance(o.result, CaptionedImage) for o in outcomes)
    return EXIT_SOME_FAILED if failed else 0


@dataclass(frozen=True)
class ModelOptions:
    """How a one-shot command runs the model."""

    device: str = "auto"
    dtype: str = "auto"
    generator: str = "fast"
    batch_size: int = 8


@contextmanager
def one_shot_path(
    settings: Settings,
    config: CheckpointConfig,
    s3: Any,
    model: ModelOptions,
    *,
    file_roots: Iterable[Path] = (),
    allow: Iterable[IPNetwork] = (),
) -> Iterator[ImagePath]:
    """The image path with its batcher in this process (one-shot commands), closed afterwards;
    local files are read from under `file_roots`, http(s) reaches `allow` besides public
    addresses (both added to the settings')."""
    run_settings = settings.model_copy(
        update={
            "device": model.device,
            "dtype": model.dtype,
            "generator": model.generator,
            "batch_size": model.batch_size,
        }
    )
    fetcher = StoreFetcher.from_settings(settings, s3, file_roots=file_roots, allow=allow)
    path = build_path(run_settings, config, fetcher=fetcher)
    try:
        yield path
    finally:
        path.close()


def say(line: str) -> None:
    """What the command is doing, on stderr at once (a hub lookup or a build takes a while)."""
    print(f"capworks: {line}", file=sys.stderr, flush=True)


def caption_with_progress(
    refs: list[ImageRef], path: ImagePath, writer: ResultWriter, request: CaptionRequest
) -> list[Outcome[CaptionedImage]]:
    """Run the image path with a progress bar (rate and ETA) on stderr."""
    columns = (
        TextColumn("captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=request.no_progress) as progress:
        task = progress.add_task("captioning", total=len(refs))
        return caption_refs(
            refs,
            path,
            writer,
            chunk_size=request.batch_size * 4,
            on_chunk=lambda chunk: progress.advance(task, len(chunk)),
        )


def outcome_dict(o: Outcome[CaptionedImage]) -> dict[str, Any]:
    """One outcome as a JSON-able dict."""
    if isinstance(o.result, CaptionedImage):
        cap = o.result.caption
        return {
            "uri": redact_uri(o.ref.uri),
            "caption": cap.text,
            "score": round(cap.score, 4),
            "alternatives": [
                {"text": a.text, "score": round(a.score, 4)} for a in cap.alternatives
            ],
            "tags": {tag: round(score, 4) for tag, score in cap.tags},
        }
    return {
        "uri": redact_uri(o.ref.uri),
        "error": o.result.code.value,
        "message": redact(o.result.message),
    }


def print_results(
    outcomes: list[Outcome[CaptionedImage]], as_json: bool, out: TextIO | None = None
) -> None:
    """JSON lines; at a terminal, a table of the first rows (named by the part of their path
    that differs) and a summary line; into a pipe, a tab-separated line per image (URI, caption,
    score, tags; or URI, "error", code, message) and the summary on stderr."""
    out = out or sys.stdout
    if as_json:
        for o in outcomes:
            out.write(json.dumps(outcome_dict(o)) + "\n")
        return
    failed = sum(1 for o in outcomes if not isinstance(o.result, CaptionedImage))
    summary = f"{len(outcomes) - failed} captioned, {failed} failed"
    if not is_terminal(out):
        for o in outcomes:
            out.write("\t".join(plain_line(v) for v in plain_row(outcome_dict(o))) + "\n")
        print(summary, file=sys.stderr)
        return
    shown = [outcome_dict(o) for o in outcomes[:TABLE_ROWS]]
    folder, names = distinguishing_names([d["uri"] for d in shown])
    table = Table("image", "caption", "tags", "score", title="capworks captions")
    table.columns[0].overflow = "fold"  # a name wraps, never cut
    for d, name in zip(shown, names, strict=True):
        if "caption" in d:
            tags = ", ".join(list(d["tags"])[:4])
            table.add_row(plain(name), plain(d["caption"]), plain(tags), f"{d['score']:.3f}")
        else:
            why = Text.assemble(plain(d["error"], "red"), ": ", plain(d["message"][:60]))
            table.add_row(plain(name), why, "", "-")
    console = Console(file=out)
    if folder:  # whole, on a line of its own: the names in the table are under it
        console.print(plain(f"images under {folder}"), soft_wrap=True)
    console.print(table)
    more = (
        f" ({len(outcomes) - TABLE_ROWS} more rows in the database)"
        if len(outcomes) > TABLE_ROWS
        else ""
    )
    console.print(summary + more)


def plain_row(d: dict[str, Any]) -> list[str]:
    """An outcome's fields for a tab-separated line."""
    if "caption" in d:
        return [d["uri"], d["caption"], f"{d['score']:.3f}", ",".join(d["tags"])]
    return [d["uri"], "error", d["error"], d["message"]]
