"""What the command lines of the ``python -m napari_hemato.train.<script>`` scripts share
(no torch).

- :func:`add_schedule_options` / :func:`schedule_options`: the dense trainers'
  (:mod:`~napari_hemato.train.nuclei`, :mod:`~napari_hemato.train.smear`) ``--epochs`` to
  ``--max-minutes``, with the trainer's own defaults;
- :func:`replay_main`: the whole command line of the two replay builders
  (:mod:`~napari_hemato.train.wbc_replay`, :mod:`~napari_hemato.train.mitosis_replay`):
  ``--model``, ``--data``, a sample count and ``--threads``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_WHOLE_NUMBERS = ("epochs", "steps_per_epoch", "batch_size", "crop", "seed", "threads")
#: the dense trainers' keywords that :func:`add_schedule_options` adds options for
SCHEDULE = (*_WHOLE_NUMBERS, "resume", "max_minutes")


def add_schedule_options(p: argparse.ArgumentParser, trainer: Callable) -> None:
    """Add ``--epochs``, ``--steps-per-epoch``, ``--batch-size``, ``--crop``, ``--seed``,
    ``--threads``, ``--resume`` and ``--max-minutes``, their defaults ``trainer``'s."""
    defaults = {name: param.default for name, param in inspect.signature(trainer).parameters.items()}
    for name in _WHOLE_NUMBERS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=defaults["max_minutes"])


def schedule_options(args: argparse.Namespace) -> dict:
    """The trainer's keywords of the options :func:`add_schedule_options` added."""
    return {name: getattr(args, name) for name in SCHEDULE}


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
