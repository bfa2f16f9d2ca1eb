"""The `capworks` command line: argument parsing and wiring of producer, workers and schema."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from capworks.cli_help import HelpFormatter, add_examples
from capworks.schema.errors import CapworksError, CheckpointError
from capworks.schema.logs import quiet_libraries
from capworks.schema.redact import escape_controls, install_log_redaction, redact
from capworks.schema.settings import BadSetting, get_settings, unknown_variable_warnings

log = logging.getLogger("capworks")
MODEL_COMMANDS = frozenset({"caption", "demo", "checkpoint", "finetune"})
MAX_ERROR_CHARS = 500  # of an unexpected error's first line


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2, and whose
    help shows every option's default (`capworks/cli_help.py`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print `capworks: error: ...` and exit 2."""
        # argparse repeats the arguments it refused: a database URL with its password, say.
        self.exit(2, f"{self.prog}: error: {redact(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    settings = get_settings()
    parser = OneLineParser(prog="capworks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    cap = sub.add_parser(
        "caption",
        help="caption local files, folders, s3:// prefixes or URLs",
        epilog="exit status: 0 every image captioned, 3 some images failed (see capworks dlq), "
        "1 the command failed, 2 bad usage",
    )
    cap.add_argument("inputs", nargs="+", metavar="INPUT")
    add_model_options(cap, settings.model)
    cap.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    cap.add_argument("--json", action="store_true", help="print results as JSON lines")
    cap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cap.add_argument(
        "--allow-address",
        action="append",
        type=cidr,
        default=[],
        metavar="CIDR",
        help="let http(s) inputs reach this network too (repeatable; e.g. 127.0.0.0/8)",
    )

    enq = sub.add_parser("enqueue", help="crawl sources and enqueue jobs for the workers")
    enq.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="s3://bucket/prefix, a local folder, @FILE with one URI per line, or an S3 "
        "Inventory: s3-inventory://bucket/path/manifest.json or a local manifest.json",
    )
    enq.add_argument("--model", default=settings.model, help="model whose captions count as done")
    enq.add_argument("--revision", default=settings.revision, help="hub revision of --model")
    enq.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    enq.add_argument("--crawl-id", help="resume this crawl (default: derived from the source)")
    redo = enq.add_mutually_exclusive_group()
    redo.add_argument("--force", action="store_true", help="re-caption objects already captioned")
    redo.add_argument(
        "--reconcile",
        action="store_true",
        help="list anew and enqueue every object with neither a caption by this model nor a "
        "failure, whatever the crawl's state (after the queue was lost)",
    )
    enq.add_argument(
        "--retry-failed",
        action="store_true",
        help="enqueue images dead-lettered by this model for a fault of the image itself "
        "(undecodable, too large, ...) too; skipped by default: they fail the same way again",
    )
    enq.add_argument("--wait", action="store_true", help="wait while another run holds this crawl")
    enq.add_argument(
        "--suffix",
        action="append",
        default=[],
        help="only names with this suffix, any case (repeat; default: the image suffixes)",
    )
    enq.add_argument("--min-bytes", type=int, help="skip smaller objects (default: no limit)")
    enq.add_argument("--max-bytes", type=int, help="skip larger objects (default: no limit)")
    enq.add_argument("--modified-since", type=iso_datetime, help="ISO date or time (UTC)")
    enq.add_argument(
        "--expect",
        type=positive_int,
        metavar="N",
        help="about how many objects the source holds, for the ETA (a URI list is counted)",
    )
    enq.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    enq.add_argument(
        "--list-streams",
        type=positive_int,
        default=1,
        metavar="N",
        help="list an s3:// source with N concurrent ListObjectsV2 streams over its prefixes",
    )
    enq.add_argument(
        "--list-processes",
        type=positive_int,
        default=1,
        metavar="P",
        help="with --list-streams: run the streams in P processes (one lists about 86k keys/s "
        "on one core)",
    )
    enq.add_argument(
        "--prefixes",
        type=lambda text: tuple(p for p in text.split(",") if p),
        default=(),
        metavar="A/,B/",
        help="with --list-streams: list these prefixes (under the source's prefix) instead of "
        "discovering folders; only their keys are crawled",
    )
    enq.add_argument(
        "--url-col",
        metavar="COL",
        help="the sources are tables (.csv, .tsv, .jsonl, .parquet; local or s3://) whose "
        "column COL holds each image's URI",
    )
    enq.add_argument("--id-col", metavar="COL", help="tables: the dataset's own key of a row")
    enq.add_argument(
        "--keep-cols",
        type=lambda text: tuple(c for c in text.split(",") if c),
        default=(),
        metavar="A,B",
        help="tables: columns kept with the image (images.extra, in exports)",
    )

    work = sub.add_parser("worker", help="run captioning workers, one process per GPU")
    work.add_argument("--gpus", default="all", help="all, cpu, or a list such as 0,1")
    work.add_argument(
        "--concurrency",
        type=positive_int,
        help="jobs held per process (default: CAPWORKS_PREFETCH_JOBS, now"
        f" {settings.prefetch_jobs})",
    )
    work.add_argument(
        "--cpu-procs",
        type=positive_int,
        metavar="N",
        help="with --gpus cpu: N processes, each with cores/N torch and decode threads"
        " (default: one process using every core)",
    )
    work.add_argument("--loglevel", default="INFO")
    work.add_argument(
        "--model",
        help="ModelScope hub id, local checkpoint folder, or an offline name (shapes, tiny-random,"
        f" large-random, tiny-wide) to serve; sets CAPWORKS_MODEL (now {settings.model!r})",
    )
    work.add_argument(
        "--revision",
        help=f"hub revision; sets CAPWORKS_REVISION (now {settings.revision or 'the newest'})",
    )
    work.add_argument(
        "--db",
        help="SQLAlchemy database URL for captions; sets CAPWORKS_DATABASE_URL (now"
        f" {redact(settings.database_url)})",
    )
    work.add_argument(
        "--file-root",
        action="append",
        default=[],
        metavar="DIR",
        help="let the workers read local images under DIR (repeatable; added to "
        "CAPWORKS_FILE_ROOTS; with none, every local path is dead-lettered as forbidden_path)",
    )

    dlq = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dlq.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    for name in ("list", "replay", "purge"):
        p = dlq_sub.add_parser(name)
        p.add_argument("--code", help="only this failure code")
        p.add_argument("--prefix", help="only URIs starting so")
        p.add_argument("--older-than", type=duration_s, help="only last seen before: 30s, 2h, 7d")
        if name == "list":
            p.add_argument("--json", action="store_true")
            p.add_argument("--limit", type=positive_int, default=100)
        if name == "replay":
            p.add_argument("--rate", type=rate_per_s, default=100.0, help="images per second: 50/s")
            p.description = "poison dead letters are replayed only with --code poison"
        if name == "purge":
            p.add_argument("--all", action="store_true", help="every dead letter (no filter)")
            p.add_argument("--yes", action="store_true", help="do not ask before purging all")
    show = dlq_sub.add_parser("show")
    show.add_argument("uri")

    ev = sub.add_parser("events", help="turn storage events (webhook, SQS, filer) into jobs")
    ev.add_argument(
        "--source",
        required=True,
        choices=["webhook", "sqs", "filer"],
        help="where storage events come from (required)",
    )
    ev.add_argument("--model", default=settings.model, help="model whose captions dedup counts")
    ev.add_argument("--revision", default=settings.revision, help="hub revision of --model")
    ev.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    ev.add_argument("--host", default="127.0.0.1", help="webhook: address to listen on")
    ev.add_argument("--port", type=int, default=8750, help="webhook: port (0: any free one)")
    ev.add_argument("--insecure", action="store_true", help="webhook: no auth (loopback only)")
    ev.add_argument("--queue-url", help="sqs: the queue (default CAPWORKS_EVENTS_SQS_QUEUE_URL)")
    ev.add_argument("--filer", help="filer: host:port (default CAPWORKS_EVENTS_FILER)")
    ev.add_argument("--path-prefix", help="filer: folder of the buckets (default /buckets/)")

    demo = sub.add_parser("demo", help="caption generated sample images with the shapes model")
    demo.add_argument("--dir", default="capworks-demo", help="folder for images and database")
    demo.add_argument("--count", type=int, default=24, help="how many sample images")

    find = sub.add_parser("search", help="find images by words of their captions and tags")
    find.add_argument(
        "query",
        help='words and "quoted phrases", all to match; -word excludes, inside the quotes: '
        '"red -blue"',
    )
    find.add_argument(
        "--in",
        dest="fields",
        default="caption",
        metavar="FIELDS",
        help="what to search, comma-separated from caption,alternatives,tags (default caption: "
        "alternatives are captions the beam rejected)",
    )
    find.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    find.add_argument("--limit", type=positive_int, default=20)
    find.add_argument("--json", action="store_true", help="print hits as JSON lines")
    find.add_argument("--rank-all", action="store_true", help="rank every match, however many")
    find.add_argument("--prefix", help="only URIs starting so (s3://bucket/dir/)")
    find.add_argument("--bucket", help="only images in this bucket")
    find.add_argument("--model", help="only captions by this model id")
    find.add_argument("--since", type=iso_datetime, help="captioned at or after (ISO, UTC)")
    find.add_argument("--until", type=iso_datetime, help="captioned before (ISO, UTC)")

    out = sub.add_parser("export", help="captions out as Parquet, JSON lines, CSV or tar shards")
    out.add_argument("out", metavar="OUT", help="a file (a folder for wds), or s3://bucket/key")
    out.add_argument("--format", choices=("parquet", "jsonl", "csv", "wds"), default="parquet")
    out.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    out.add_argument("--model", help="only captions by this model id")
    out.add_argument("--since", type=iso_datetime, help="captioned after (ISO, UTC)")
    out.add_argument("--mark", help="incremental: export after this named mark, then move it")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    stat = sub.add_parser("status", help="queue, workers, recent throughput and crawls")
    stat.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    stat.add_argument("--json", action="store_true", help="print one JSON object")
    stat.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    stat.add_argument("--interval", type=duration_s, default=2.0, help="--watch period: 2s, 1m")
    stat.add_argument(
        "--serve-metrics",
        type=port_number,
        metavar="PORT",
        help="serve queue depth, dead letters and workers as Prometheus metrics on PORT "
        "(CAPWORKS_METRICS_HOST; off loopback, CAPWORKS_METRICS_TOKEN) until stopped",
    )
    health = sub.add_parser("health", help="exit 0 when healthy, 1 with the reasons when not")
    health.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    health.add_argument("--host", help="require a fresh worker heartbeat from this host")
    health.add_argument(
        "--worker",
        action="store_true",
        help="require a fresh heartbeat from a worker on this host or container (the probe "
        "of a worker container; twins with one hostname are told apart by pid namespace)",
    )
    health.add_argument("--no-database", action="store_true", help="do not check the database")

    ev_ = sub.add_parser("eval", help="score captions against reference captions (COCO metrics)")
    ev_.add_argument("references", help="COCO captions .json, or .jsonl/.csv of uri,caption rows")
    add_model_options(ev_, settings.model)
    ev_.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    ev_.add_argument("--settings-hash", help="generation settings of the captions to score")
    ev_.add_argument("--caption", action="store_true", help="caption the images first")
    ev_.add_argument("--images-root", help="folder, s3:// prefix or URL of relative image names")
    ev_.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="take absolute names and `..` in the references (read outside the images root)",
    )
    ev_.add_argument(
        "--worst", type=positive_int, default=10, metavar="N", help="list the N lowest CIDEr-D"
    )
    ev_.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"])
    ev_.add_argument("--no-meteor", action="store_true", help="skip METEOR (~10 s of Java start)")
    ev_.add_argument("--json", action="store_true", help="print one JSON object")
    ev_.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ft = sub.add_parser("finetune", help="fine-tune a model on (image, caption) pairs (train venv)")
    ft.add_argument("references", help="COCO captions .json, or .jsonl/.csv of uri,caption rows")
    ft.add_argument("--output", required=True, help="folder to write the fine-tuned model to")
    ft.add_argument("--model", default=settings.model, help="the base model (as for caption)")
    ft.add_argument("--revision", help="the base model's hub revision")
    ft.add_argument("--images-root", help="folder, s3:// prefix or URL of relative image names")
    ft.add_argument("--epochs", type=positive_int, default=1)
    ft.add_argument("--max-steps", type=positive_int, help="stop after N steps (whole epochs)")
    ft.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    ft.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then decay")
    ft.add_argument(
        "--lr-schedule",
        default="linear",
        choices=["linear", "cosine", "const"],
        help="the decay after the warm-up: to zero in a line or a half cosine, or none",
    )
    ft.add_argument("--label-smoothing", type=float, default=0.1, help="0 keeps plain CE")
    ft.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step and GPU")
    ft.add_argument("--grad-accum", type=positive_int, default=1, help="steps per update")
    ft.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="fp16: CUDA AMP")
    ft.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps")
    ft.add_argument("--held-out", type=float, default=0.1, help="share of images held out")
    ft.add_argument("--work-dir", help="checkpoints and logs (default: OUTPUT.work)")
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"])
    ft.add_argument("--json", action="store_true", help="print one JSON object")
    ft.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    ckpt = sub.add_parser("checkpoint", help="list and build offline checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    build = ckpt_sub.add_parser("build", help="build a checkpoint into the cache")
    build.add_argument("name", choices=["shapes", "tiny-random", "large-random", "tiny-wide"])
    ckpt_sub.add_parser("list", help="the offline checkpoints: built (where) or not")
    add_examples(sub.choices.items())
    for command in sub.choices.values():  # `capworks search x -v` as well as `capworks -v ...`
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
        )
    return parser


def add_model_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    """Options that choose and run the model."""
    settings = get_settings()
    parser.add_argument(
        "--model",
        default=default_model,
        help="ModelScope hub id, local checkpoint folder, or an offline name "
        "(shapes, tiny-random, large-random, tiny-wide)",
    )
    parser.add_argument("--revision", default=settings.revision, help="hub revision")
    parser.add_argument("--batch-size", type=positive_int, default=settings.batch_size)
    parser.add_argument("--device", default=settings.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default=settings.dtype, choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument(
        "--generator",
        default=settings.generator,
        choices=["fast", "reference"],
        help="fast: KV-cached beam search (default); reference: ModelScope's generator",
    )


def positive_int(text: str) -> int:
    """An argparse type for integers >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type for TCP ports 0..65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


def iso_datetime(text: str) -> datetime:
    """An argparse type for ISO 8601 dates and times (naive means UTC)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def duration_s(text: str) -> float:
    """An argparse type for durations such as 90s, 15m, 2h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration like 30s, 2h or 7d: {text!r}") from None


def cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An argparse type for a network such as 10.0.0.0/8 or ::1/128 (a bare address is /32)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a network like 10.0.0.0/8: {exc}") from None


def rate_per_s(text: str) -> float:
    """An argparse type for rates such as 50/s or 50."""
    try:
        value = float(text.removesuffix("/s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate like 50/s: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be positive: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `capworks` console script."""
    code = run_command(argv)
    try:  # what is still buffered goes now, while a reader that left can be told apart
        sys.stdout.flush()
    except BrokenPipeError:
        from capworks.output import EXIT_BROKEN_PIPE, silence_broken_pipe

        silence_broken_pipe()
        return EXIT_BROKEN_PIPE
    return code


def run_command(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the command: its exit status."""
    try:
        parser = build_parser()
    except BadSetting as exc:
        print(f"capworks: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    for line in unknown_variable_warnings():  # once per command, not once per worker process
        print(f"capworks: warning: {line}", file=sys.stderr)
    # Only the commands that load a model pay for importing transformers (~4 s) to quiet it.
    loads_model = args.command in MODEL_COMMANDS or getattr(args, "caption", False) is True
    configure_logging(args.verbose, quiet_transformers=loads_model)
    try:
        if args.command == "caption":
            from capworks.commands.caption import CaptionRequest, run_caption

            return run_caption(
                CaptionRequest(
                    tuple(args.inputs),
                    args.db,
                    args.model,
                    args.revision,
                    args.device,
                    args.dtype,
                    args.generator,
                    args.batch_size,
                    args.json,
                    args.no_progress,
                    tuple(args.allow_address),
                )
            )
        if args.command == "enqueue":
            from capworks.commands.enqueue import run_enqueue

            return run_enqueue(args)
        if args.command == "worker":
            from capworks.commands.worker import run_worker

            return run_worker(args)
        if args.command == "dlq":
            from capworks.commands.dlq import run_dlq

            return run_dlq(args)
        if args.command == "export":
            from capworks.commands.export import ExportRequest, run_export

            return run_export(
                ExportRequest(
                    args.out,
                    args.format,
                    args.db,
                    args.model,
                    args.since,
                    args.mark,
                    show_progress=not args.no_progress,
                )
            )
        if args.command == "search":
            from capworks.commands.search import SearchRequest, as_utc, run_search
            from capworks.schema.search import Filters, parse_fields

            filters = Filters(
                args.prefix, args.bucket, args.model, as_utc(args.since), as_utc(args.until)
            )
            fields = parse_fields(args.fields)
            return run_search(
                SearchRequest(
                    args.db, args.query, filters, args.limit, args.json, args.rank_all, fields
                )
            )
        if args.command == "events":
            from capworks.commands.events import EventsOptions, run_events

            return run_events(
                EventsOptions(
                    args.source,
                    args.db,
                    args.model,
                    args.revision,
                    host=args.host,
                    port=args.port,
                    insecure=args.insecure,
                    queue_url=args.queue_url,
                    filer=args.filer,
                    path_prefix=args.path_prefix,
                )
            )
        if args.command in ("status", "health"):
            from capworks.commands import status
            from capworks.schema.queue import redis_address

            settings = get_settings()
            farm = status.FarmAddress(
                redis_address(settings), args.db, settings.queue_name, settings.heartbeat_stale_s
            )
            if args.command == "status":
                return status.run_status(
                    status.StatusRequest(
                        farm,
                        args.json,
                        args.watch,
                        args.interval,
                        args.serve_metrics,
                        settings.metrics_host,
                        settings.metrics_token,
                        settings.metrics_allow_open,
                    )
                )
            request = status.HealthRequest(farm, args.host, not args.no_database, args.worker)
            return status.run_health(request)
        if args.command == "eval":
            from pathlib import Path

            from capworks.commands.eval import CaptionOptions, EvalRequest, run_eval

            run = CaptionOptions(args.batch_size, args.device, args.dtype, args.generator)
            return run_eval(
                EvalRequest(
                    Path(args.references),
                    args.db,
                    args.model,
                    args.revision,
                    settings_hash=args.settings_hash,
                    images_root=args.images_root,
                    allow_outside_root=args.allow_outside_root,
                    caption=run if args.caption else None,
                    worst=args.worst,
                    as_json=args.json,
                    tokenizer=args.tokenizer,
                    meteor=False if args.no_meteor else None,
                    show_progress=not args.no_progress,
                )
            )
        if args.command == "finetune":
            from pathlib import Path

            from capworks.commands.finetune import FinetuneRequest, run_finetune
            from capworks.finetune.trainer import TrainOptions

            train = TrainOptions(
                epochs=args.epochs,
                max_steps=args.max_steps,
                lr=args.lr,
                warmup_steps=args.warmup_steps,
                lr_schedule=args.lr_schedule,
                label_smoothing=args.label_smoothing,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                precision=args.precision,
                save_every=args.save_every,
                seed=args.seed,
            )
            return run_finetune(
                FinetuneRequest(
                    Path(args.references),
                    Path(args.output),
                    args.model,
                    args.revision,
                    train,
                    images_root=args.images_root,
                    held_out=args.held_out,
                    work_dir=Path(args.work_dir) if args.work_dir else None,
                    tokenizer=args.tokenizer,
                    as_json=args.json,
                    show_progress=not args.no_progress,
                )
            )
        if args.command == "demo":
            from capworks.commands.demo import run_demo

            return run_demo(args.dir, args.count)
        if args.action == "list":
            from capworks.commands.checkpoint import run_checkpoint_list

            return run_checkpoint_list(get_settings().checkpoint_dir)
        from capworks.checkpoints.build import ensure_checkpoint

        print(ensure_checkpoint(args.name, get_settings().checkpoint_dir))
        return 0
    except BrokenPipeError:  # stdout's reader stopped early (`| head`): not worth a traceback
        from capworks.output import EXIT_BROKEN_PIPE, silence_broken_pipe

        silence_broken_pipe()
        return EXIT_BROKEN_PIPE
    except (CapworksError, CheckpointError, ValueError) as exc:
        print(f"capworks: error: {escape_controls(redact(str(exc)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capworks: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one redacted line (the traceback with -v), exit 1
        if args.verbose:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(f"capworks: error: {unexpected_error_line(exc, args.verbose > 0)}", file=sys.stderr)
        return 1


def unexpected_error_line(exc: BaseException, verbose: bool) -> str:
    """An error nobody expected (a database's, a library's) as one redacted line: its type and
    its message's first line (SQLAlchemy's go on with the statement and its parameters)."""
    lines = str(exc).strip().splitlines()
    first = lines[0][:MAX_ERROR_CHARS] if lines else ""
    hint = "" if verbose else " (-v shows the traceback)"
    return escape_controls(redact(f"{type(exc).__name__}: {first}")) + hint


def configure_logging(verbosity: int, quiet_transformers: bool = True) -> None:
    """Our loggers at WARNING (INFO with -v); the model libraries' chatter at ERROR."""
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    # The same set a worker quiets (schema/logs.py).
    quiet_libraries(level, import_transformers=quiet_transformers)


if __name__ == "__main__":
    sys.exit(main())
