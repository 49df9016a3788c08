"""``napari-hemato`` command line.

Subcommands: ``info``, ``analyze``, ``demo``, ``models``, ``classify-cells``,
``train``, ``evaluate``, ``finetune``; each has ``--help``. Errors print one line naming the
file and the problem and exit with status 2 (so do file system errors: disk full,
permissions); Ctrl-C stops a run with status
130, keeping finished tiles for ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from napari_hemato import __version__
from napari_hemato.core.errors import HematoError

#: the module (``napari_hemato.cli.<module>``) that registers each subcommand: a command
#: given on the command line imports only its own module (``classify-cells`` starts without
#: the task registry and pandas); ``--help`` and unknown commands build the whole parser
COMMANDS = {"info": "analyze", "analyze": "analyze", "demo": "analyze", "models": "models",
            "classify-cells": "models", "train": "models", "evaluate": "models",
            "export": "export", "finetune": "finetune"}
MODULES = ("analyze", "models", "export", "finetune")


def _command(argv: list[str] | None) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for word in sys.argv[1:] if argv is None else argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; with ``command``, only the subcommands of its module."""
    parser = argparse.ArgumentParser(
        prog="napari-hemato",
        description="Whole-slide deep learning for blood smears and H&E (headless core of the napari plugin).",
    )
    parser.add_argument("--version", action="version", version=f"napari-hemato {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in (COMMANDS[command],) if command else MODULES:
        import_module(f"napari_hemato.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command(argv))
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HematoError as err:
        sys.stderr.write(f"napari-hemato: error: {err}\n")
        return 2
    except OSError as err:  # a file the core did not name (disk full, permissions): still one line
        if args.verbose:
            raise
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"napari-hemato: error: {where}{err.strerror or err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
