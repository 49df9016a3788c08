"""The benchmarks' one way to report: a JSON object on stdout, and in a file when asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(out: dict, path=None, *, indent: int = 1, default=None) -> None:
    """Print ``out`` as JSON and, with ``path``, write the same text there."""
    text = json.dumps(out, indent=indent, default=default)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
