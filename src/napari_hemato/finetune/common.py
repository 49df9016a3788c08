"""What every fine-tune shares: the written model folder, its card, progress and cancel."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError
from napari_hemato.core.spec import load_spec, write_spec


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


def write_model_folder(out: str | Path, base_folder: Path, model, spec_changes: dict, card: str,
                       metrics: dict, *, overwrite: bool = False) -> Path:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_edit.save(model, tmp / "model.onnx")
        write_spec(tmp, spec)
        (tmp / "MODEL_CARD.md").write_text(card)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        for extra in ("replay.npz",):  # the reference embeddings travel with the model
            if (base_folder / extra).is_file():
                shutil.copy2(base_folder / extra, tmp / extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
