"""Small helpers shared by the command-line subcommands."""

from __future__ import annotations

import argparse
import sys


def out(text: str = "") -> None:
    """Write a line to stdout (the CLI's only way of printing)."""
    sys.stdout.write(text + "\n")


def roi_arg(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(float(v)) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--roi wants y0,x0,y1,x1 in level-0 pixels, got {text!r}")
    return values


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def progress_bar(total: int, initial: int, desc: str, unit: str = "tile"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                disable=None, dynamic_ncols=True)
