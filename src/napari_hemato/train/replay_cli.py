"""The command line both replay builders share (no torch): ``--model``, ``--data``, a count
and ``--threads``, then the size of the ``replay.npz`` written.

:mod:`napari_hemato.train.wbc_replay` and :mod:`napari_hemato.train.mitosis_replay` differ
in what they read and how many items they sample (``--per-class``, ``--train-crops``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def replay_main(argv: list[str] | None, *, module: str, doc: str, task: str, data_help: str,
                count: str, default: int, build: Callable[..., Path]) -> int:
    """Run ``python -m <module>``: ``build(model, data, <count>=N, threads=T)`` writes the replay.

    ``doc``'s first line describes the command; ``count`` is the option of the sample size
    (e.g. ``--per-class``), passed to ``build`` as its keyword (``per_class``).
    """
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    p.add_argument("--model", required=True, help=f"{task} model folder (replay.npz is written into it)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument(count, type=int, default=default)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    keyword = count.lstrip("-").replace("-", "_")
    path = build(Path(args.model), Path(args.data), **{keyword: getattr(args, keyword)},
                 threads=args.threads)
    log.info("%s: %.1f MB", path, path.stat().st_size / 1e6)
    return 0
