"""The `capworks` command line: argument parsing and wiring of producer, workers and schema."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from schema.errors import CapworksError, CheckpointError
from schema.settings import get_settings

log = logging.getLogger("capworks")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print `capworks: error: ...` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    settings = get_settings()
    parser = OneLineParser(prog="capworks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    cap = sub.add_parser("caption", help="caption local files, folders, s3:// prefixes or URLs")
    cap.add_argument("inputs", nargs="+", metavar="INPUT")
    add_model_options(cap, settings.model)
    cap.add_argument("--db", default=settings.database_url, help="SQLAlchemy database URL")
    cap.add_argument("--json", action="store_true", help="print results as JSON lines")
    cap.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    demo = sub.add_parser("demo", help="caption generated sample images with the shapes model")
    demo.add_argument("--dir", default="capworks-demo", help="folder for images and database")
    demo.add_argument("--count", type=int, default=24, help="how many sample images")

    ckpt = sub.add_parser("checkpoint", help="build offline checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    build = ckpt_sub.add_parser("build", help="build a checkpoint into the cache")
    build.add_argument("name", choices=["shapes", "tiny-random", "large-random"])
    return parser


def add_model_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    """Options that choose and run the model."""
    settings = get_settings()
    parser.add_argument("--model", default=default_model,
                        help="ModelScope hub id, local checkpoint folder, or an offline name "
                             "(shapes, tiny-random, large-random)")
    parser.add_argument("--revision", default=settings.revision, help="hub revision")
    parser.add_argument("--batch-size", type=positive_int, default=settings.batch_size)
    parser.add_argument("--device", default=settings.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=settings.dtype,
                        choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--generator", default="reference", choices=["reference"])


def positive_int(text: str) -> int:
    """An argparse type for integers >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `capworks` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "caption":
            from capworks.commands.caption import run_caption

            return run_caption(args)
        if args.command == "demo":
            from capworks.commands.demo import run_demo

            return run_demo(args)
        from capworks.checkpoints.build import ensure_checkpoint

        print(ensure_checkpoint(args.name, get_settings().checkpoint_dir))
        return 0
    except (CapworksError, CheckpointError, ValueError) as exc:
        print(f"capworks: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capworks: interrupted", file=sys.stderr)
        return 130


def configure_logging(verbosity: int) -> None:
    """Our loggers at WARNING (INFO with -v); the model libraries' chatter at ERROR."""
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("modelscope", "transformers", "fairseq", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
