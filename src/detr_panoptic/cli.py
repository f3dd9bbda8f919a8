"""The ``detr-panoptic`` command: parse arguments, call library functions, print.

Each subcommand lives in ``detr_panoptic.commands.<area>`` as a ``register(subparsers)`` function
that adds its parser and sets ``func``. Bad input raises ``ValueError``/``FileNotFoundError``; here
it becomes one line on stderr and exit status 2 (a traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from detr_panoptic import __version__
from detr_panoptic.utils.logging import setup_logging

# Modules under detr_panoptic.commands, in the order their subcommands appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "config",
    "data",
    "train",
    "evaluate",
    "cityscapes_eval",
    "calibrate",
    "visualize",
    "demo",
    "export",
    "app",
)

log = logging.getLogger("detr_panoptic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr-panoptic",
        description="Panoptic segmentation with DETR: convert Cityscapes, fine-tune in stages, "
        "measure PQ, predict and draw.",
    )
    parser.add_argument("--version", action="version", version=f"detr-panoptic {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"detr_panoptic.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(debug=args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"detr-panoptic {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detr-panoptic {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
