"""What every fine-tune shares: progress and cancel, the settings search, the written model folder.

A fine-tune (:mod:`~napari_hemato.finetune.wbc`, :mod:`~napari_hemato.finetune.mitosis`)
:func:`begin` s, reads its corrections and fits a head for each setting of
:func:`search_settings`, then :func:`finish` es: the refit layer in a copy of the ONNX
graph, written by :func:`write_model_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError
from napari_hemato.core.spec import file_sha256, load_spec, write_spec

log = logging.getLogger(__name__)


class FinetuneCancelled(HematoError):
    """The user cancelled; nothing was written."""


@dataclass
class Progress:
    """Reports ``(step, fraction)`` to ``callback`` and stops on ``cancel``."""

    callback: Callable[[str, float], None] | None = None
    cancel: CancelToken | None = None
    started: float = field(default_factory=time.monotonic)

    def __call__(self, step: str, fraction: float) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise FinetuneCancelled("fine-tuning cancelled: no model was written")
        if self.callback is not None:
            self.callback(step, float(fraction))

    @property
    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60


@dataclass
class FinetuneResult:
    """A fine-tuned model folder and what was measured on it."""

    folder: Path
    metrics: dict[str, Any]
    corrections: dict[str, Any]
    minutes: float


def begin(task: str, base: str | Path | None, progress: Progress | None) -> tuple[Progress, Path]:
    """The fine-tune's progress (a silent one by default) and the folder of its ``base`` model
    (default: the bundled model of ``task``); reports that the corrections are read next."""
    from napari_hemato.models.registry import resolve_model

    progress = progress or Progress()
    base_folder = resolve_model(task, base)
    progress("reading the corrections", 0.0)
    return progress, base_folder


def search_settings(settings: list[tuple[float, float]], fit: Callable[[float, float], dict], *,
                    keeps: Callable[[dict], bool], score: str, what: str, progress: Progress,
                    max_minutes: float) -> tuple[list[dict], dict | None]:
    """Try each ``(l2, share)`` of ``settings`` (most conservative first): ``(tried, best)``.

    ``fit(l2, share)`` fits the head with that setting and returns its scores; each row of
    ``tried`` is ``{"l2", "share", **scores}``. ``best`` is the row with the highest
    ``score`` among those ``keeps(row)`` accepts (None: none did). Once one is accepted the
    search stops at 80 % of ``max_minutes``; ``what`` is the head in the progress reports.
    """
    tried, best = [], None
    for k, (l2, share) in enumerate(settings):
        if progress.minutes > 0.8 * max_minutes and best is not None:
            log.info("fine-tune: time budget reached after %d of %d settings", k, len(settings))
            break
        progress(f"fitting the {what} ({k + 1}/{len(settings)})", 0.5 + 0.4 * k / len(settings))
        row = {"l2": l2, "share": share, **fit(l2, share)}
        tried.append(row)
        if keeps(row) and (best is None or row[score] > best[score] + 1e-9):
            best = row
    return tried, best


def finish(out: str | Path, base_folder: Path, spec, model, *, method: str, corrections: dict,
           metrics: dict, card: Callable[[str, float], str], progress: Progress,
           overwrite: bool = False, int8_model=None) -> FinetuneResult:
    """Write the fine-tuned ``model`` of the base model ``spec`` to ``out``; its result.

    The spec is renamed ``<name>-finetuned`` and records under ``extra.finetune`` the base
    (name, version, ONNX SHA-256), ``method``, ``corrections``, the setting chosen
    (``metrics["chosen"]``), the date and the minutes; ``card(date, minutes)`` is the card.
    ``int8_model``: the base's int8 network with the same refit (when the refit layer is a float
    layer of it), kept beside the float one; without it the copy has the float network only.
    """
    minutes = progress.minutes
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    changes = {
        "name": f"{spec.name}-finetuned", "version": spec.version,
        "extra": {"finetune": {
            "base": {"name": spec.name, "version": spec.version, "sha256": file_sha256(spec.onnx_path)},
            "method": method, "corrections": corrections, "chosen": metrics["chosen"], "date": stamp,
            "minutes": round(minutes, 2),
        }},
    }
    progress("writing the model", 0.97)
    folder = write_model_folder(out, base_folder, model, changes, card(stamp, minutes), metrics,
                                overwrite=overwrite, int8_model=int8_model)
    progress("done", 1.0)
    return FinetuneResult(folder, metrics, corrections, minutes)


def write_model_folder(out: str | Path, base_folder: Path, model, spec_changes: dict, card: str,
                       metrics: dict, *, overwrite: bool = False, int8_model=None) -> Path:
    """Write ``model`` (an ``onnx.ModelProto``) + spec + card + metrics to ``out`` atomically.

    The spec is the base model's with ``spec_changes`` applied (name, version, extra).
    ``out`` appears complete or not at all (a temporary folder beside it is renamed).
    """
    from napari_hemato.finetune import onnx_edit

    out = Path(out)
    if out.exists() and not overwrite:
        raise HematoError(f"{out}: already exists (choose another --out, or --overwrite)")
    base = load_spec(base_folder).to_dict()
    spec = {**base, **spec_changes}
    spec["extra"] = {**(base.get("extra") or {}), **(spec_changes.get("extra") or {})}
    spec["onnx"] = "model.onnx"
    if int8_model is None or not base.get("int8"):
        spec.pop("int8", None)  # the base's int8 network has the base's weights, not these
        spec.get("extra", {}).pop("quantization", None)
        int8_model = None
    else:
        spec["int8"] = {**base["int8"], "onnx": "model_int8.onnx"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_edit.save(model, tmp / "model.onnx")
        if int8_model is not None:
            onnx_edit.save(int8_model, tmp / "model_int8.onnx")
        write_spec(tmp, spec)
        (tmp / "MODEL_CARD.md").write_text(card)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        # the reference embeddings travel with the model, with the licence of any data they hold
        for extra in ("replay.npz", *(p.name for p in base_folder.glob("LICENSE-*"))):
            if (base_folder / extra).is_file():
                shutil.copy2(base_folder / extra, tmp / extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
