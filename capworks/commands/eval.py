"""`capworks eval REFERENCES`: COCO caption metrics of one model's captions against references.

The hypotheses are the captions the database holds for one model identity (model id, revision,
generation settings hash), or, with `--caption`, captions made first through the same image path
as `capworks caption` (and stored like them).
"""

from __future__ import annotations

import contextlib
import json
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, func, select

from capworks.evaluation import (
    EvaluationError,
    Scores,
    TokenizerName,
    choose_tokenizer,
    score_captions,
)
from capworks.plain import plain
from capworks.references import References, ReferenceSet, RefusedRow, read_references
from capworks.schema.checkpoint import folder_model_id
from capworks.schema.redact import escape_controls
from capworks.schema.settings import get_settings
from capworks.schema.tables import Caption, Image
from capworks.schema.uris import ImageRef, is_http, is_s3, local_path, parse_s3

# SQLite allows 999 bound parameters in old builds: look URIs up in chunks well below that.
URI_CHUNK = 500
SPICE_NOTE = "SPICE is not computed: it fetches Stanford CoreNLP models at run time"


@dataclass(frozen=True)
class CaptionOptions:
    """How `--caption` runs the model: the options of `capworks caption`."""

    batch_size: int
    device: str
    dtype: str
    generator: str


@dataclass(frozen=True)
class EvalRequest:
    """What `capworks eval` was asked."""

    references: Path
    db_url: str
    model: str
    revision: str | None
    settings_hash: str | None = None
    images_root: str | None = None
    caption: CaptionOptions | None = None
    worst: int = 10
    as_json: bool = False
    tokenizer: TokenizerName = "auto"
    meteor: bool | None = None  # None: when Java is there (it takes ~10 s to load its tables)
    show_progress: bool = True
    # Take absolute names and `..` in the references file (read from outside the images root).
    allow_outside_root: bool = False


@dataclass
class Hypotheses:
    """One caption per image of one model identity, and why the other images have none."""

    identity: tuple[str, str, str]
    captions: dict[str, str]
    missing: dict[str, str] = field(default_factory=dict)  # uri -> reason


def run_eval(request: EvalRequest) -> int:
    """Score the model's captions of the reference images; print a table or one JSON object."""
    from capworks.schema.db import connect

    tokenizer = choose_tokenizer(request.tokenizer)  # before any work: `ptb` needs Java
    loaded = read_references(
        request.references, request.images_root, allow_outside_root=request.allow_outside_root
    )
    refs = loaded.refs
    print_refused(loaded.refused)
    db = connect(request.db_url)
    if request.caption is not None:
        roots = file_roots(loaded, request.allow_outside_root)
        hyps = caption_references(list(refs), db, request, request.caption, roots)
    else:
        hyps = hypotheses_from_db(db, list(refs), request)
    if not hyps.captions:
        model_id, revision, digest = hyps.identity
        raise EvaluationError(
            f"none of the {len(refs)} reference images has a caption by {model_id!r} "
            f"(revision {revision!r}, settings {digest}); images are matched by URI (see "
            "--images-root); caption them first or pass --caption"
        )
    status = Console(stderr=True).status("scoring", spinner="dots")
    with status if request.show_progress else contextlib.nullcontext():
        scores = score_captions(refs, hyps.captions, tokenizer, request.meteor)
    report = eval_report(refs, hyps, scores, request)
    report["refused"] = [vars(row) for row in loaded.refused]
    if request.as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        print_report(report)
    return 0


def print_refused(refused: list[RefusedRow]) -> None:
    """One line on stderr for each row whose name leaves the images root."""
    for row in refused:
        line = f"capworks: refused {row.where}: {row.name!r}: {row.reason}"
        print(escape_controls(line), file=sys.stderr)


def file_roots(loaded: ReferenceSet, allow_outside_root: bool) -> list[Path]:
    """What `--caption` may read: the images root (no symlink under it followed), or with
    `--allow-outside-root` each named file wherever it is."""
    if allow_outside_root:
        return [local_path(u) for u in loaded.refs if not is_s3(u) and not is_http(u)]
    return [loaded.local_root] if loaded.local_root is not None else []


def model_id_of(model: str) -> str:
    """The model id captions are stored under: a local folder's content identity (the same
    `local:<hash>` workers store, whatever the path), else the name."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    return folder_model_id(path.resolve(), get_settings().checkpoint_dir)


def hypotheses_from_db(db: Engine, uris: Sequence[str], request: EvalRequest) -> Hypotheses:
    """The stored captions of the reference images by the requested model identity."""
    model_id, revision = model_id_of(request.model), request.revision or ""
    digest = request.settings_hash or only_settings_hash(db, model_id, revision)
    captions: dict[str, str] = {}
    with db.connect() as conn:
        for start in range(0, len(uris), URI_CHUNK):
            rows = conn.execute(
                select(Image.uri, Caption.text)
                .join(Caption, Caption.image_id == Image.id)
                .where(
                    Image.uri.in_(uris[start : start + URI_CHUNK]),
                    Caption.model_id == model_id,
                    Caption.revision == revision,
                    Caption.settings_hash == digest,
                )
            )
            captions.update((uri, text) for uri, text in rows)
    missing = {uri: "no caption in the database" for uri in uris if uri not in captions}
    return Hypotheses((model_id, revision, digest), captions, missing)


def only_settings_hash(db: Engine, model_id: str, revision: str) -> str:
    """The one generation-settings hash this model's captions have; several need a choice."""
    with db.connect() as conn:
        rows = conn.execute(
            select(Caption.settings_hash, func.count())
            .where(Caption.model_id == model_id, Caption.revision == revision)
            .group_by(Caption.settings_hash)
        ).all()
    if not rows:
        raise EvaluationError(
            f"the database holds no caption by {model_id!r} (revision {revision!r}); "
            "check --model/--revision or pass --caption"
        )
    if len(rows) > 1:
        found = ", ".join(f"{digest} ({count} captions)" for digest, count in rows)
        raise EvaluationError(f"{model_id!r} has captions of several settings: pass one of {found}")
    return str(rows[0][0])


def caption_references(
    uris: Sequence[str],
    db: Engine,
    request: EvalRequest,
    options: CaptionOptions,
    roots: Sequence[Path] = (),
) -> Hypotheses:
    """Caption the reference images through the `capworks caption` path, storing the captions;
    local files are read from under `roots` only."""
    from capworks.commands.caption import ModelOptions, RateColumn, one_shot_path
    from capworks.models import resolve_model
    from capworks.schema.settings import get_settings
    from capworks.schema.storage import make_s3_client
    from capworks.workers.engine import CaptionedImage
    from capworks.workers.persist import ResultWriter
    from capworks.workers.pipeline import caption_refs

    settings = get_settings()
    config = resolve_model(request.model, request.revision, settings)
    s3 = make_s3_client(settings) if any(is_s3(u) for u in uris) else None
    model = ModelOptions(options.device, options.dtype, options.generator, options.batch_size)
    columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), RateColumn())
    progress = Progress(
        *columns,
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not request.show_progress,
    )
    with one_shot_path(settings, config, s3, model, file_roots=roots) as path, progress:
        task = progress.add_task("captioning", total=len(uris))
        outcomes = caption_refs(
            [image_ref(u) for u in uris],
            path,
            ResultWriter(db, config),
            chunk_size=options.batch_size * 4,
            on_chunk=lambda chunk: progress.advance(task, len(chunk)),
        )
    hyps = Hypotheses(config.identity, {})
    for o in outcomes:
        if isinstance(o.result, CaptionedImage):
            hyps.captions[o.ref.uri] = o.result.caption.text
        else:
            hyps.missing[o.ref.uri] = f"{o.result.code.value}: {o.result.message}"
    return hyps


def image_ref(uri: str) -> ImageRef:
    """The reference the image path fetches, under the URI the references name (a missing file
    fails there as `not_found`; a symlink is not followed here, and the fetch refuses it)."""
    from capworks.producer.sources import stat_ref

    if is_s3(uri):
        loc = parse_s3(uri)
        return ImageRef(uri=uri, bucket=loc.bucket, key=loc.key)
    if is_http(uri):
        return ImageRef(uri=uri)
    try:
        st = local_path(uri).lstat()
    except OSError:
        return ImageRef(uri=uri)
    return stat_ref(uri, st) if stat.S_ISREG(st.st_mode) else ImageRef(uri=uri)


def eval_report(
    refs: References, hyps: Hypotheses, scores: Scores, request: EvalRequest
) -> dict[str, Any]:
    """Everything the command says, as JSON-able values."""
    model_id, revision, digest = hyps.identity
    worst = sorted(scores.cider_per_image.items(), key=lambda item: (item[1], item[0]))
    return {
        "references": str(request.references),
        "model": {"model_id": model_id, "revision": revision, "settings_hash": digest},
        "tokenizer": scores.tokenizer,
        "images_scored": scores.images,
        "reference_captions": sum(len(refs[uri]) for uri in scores.cider_per_image),
        "metrics": {name: round(value, 6) for name, value in scores.metrics.items()},
        "not_scored": [{"uri": uri, "reason": why} for uri, why in hyps.missing.items()],
        "worst": [
            {
                "uri": uri,
                "cider_d": round(value, 6),
                "caption": hyps.captions[uri],
                "references": refs[uri],
            }
            for uri, value in worst[: request.worst]
        ],
        "notes": [SPICE_NOTE] + ([] if "METEOR" in scores.metrics else [meteor_note(request)]),
    }


def meteor_note(request: EvalRequest) -> str:
    """Why the report has no METEOR."""
    if request.meteor is False:
        return "METEOR is not computed: --no-meteor"
    return "METEOR is not computed: no java on PATH"


def print_report(report: dict[str, Any]) -> None:
    """The metrics table, the worst images by CIDEr-D, and what was not scored."""
    console = Console()
    model = report["model"]
    revision = f" @ {model['revision']}" if model["revision"] else ""
    console.print(
        Text.assemble(("capworks eval", "bold"), ": ", plain(model["model_id"] + revision))
    )
    table = Table("metric", "score")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    console.print(
        plain(
            f"{report['images_scored']} images scored against {report['reference_captions']} "
            f"reference captions (tokenizer: {report['tokenizer']}, "
            f"settings {model['settings_hash']})"
        )
    )
    if report["worst"]:
        worst = Table("CIDEr-D", "image", "caption", "a reference", title="lowest CIDEr-D")
        worst.columns[1].overflow = "fold"
        for row in report["worst"]:
            worst.add_row(
                f"{row['cider_d']:.3f}",
                plain(row["uri"]),
                plain(row["caption"]),
                plain(row["references"][0]),
            )
        console.print(worst)
    refused = report.get("refused", [])
    if refused:
        console.print(
            plain(
                f"{len(refused)} reference rows refused: their names leave the images"
                " root (listed on stderr; --allow-outside-root reads them)",
                "yellow",
            )
        )
    missing = report["not_scored"]
    if missing:
        shown = "; ".join(f"{m['uri']} ({m['reason']})" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        console.print(
            Text.assemble(
                (f"{len(missing)} images not scored", "yellow"), ": ", plain(shown + more)
            )
        )
    for note in report["notes"]:
        console.print(plain(note, "dim"))
