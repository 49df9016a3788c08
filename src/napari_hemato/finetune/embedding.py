"""Give a classifier model an ``embedding`` output: the pooled features its head reads."""

from __future__ import annotations

import json
from pathlib import Path

from napari_hemato.core.spec import write_spec
from napari_hemato.finetune import onnx_edit


def add_output(folder: str | Path, role: str, locate) -> bool:
    """Expose the internal tensor ``locate(onnx_model, spec)`` returns as output ``role`` of
    the model in ``folder`` (in place; an Identity node: the computation is unchanged).

    ``model.json`` gains the role and the new ``sha256``. Returns False when it was there
    already."""
    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    if role in spec.get("outputs", {}):
        return False
    path = folder / spec.get("onnx", "model.onnx")
    model = onnx_edit.load(path)
    onnx_edit.expose(model, locate(model, spec), role)
    onnx_edit.save(model, path)
    spec["outputs"] = {**spec["outputs"], role: role}
    write_spec(folder, spec)
    return True


def add_embedding_output(folder: str | Path) -> bool:
    """Expose the input of the model's linear head as output ``embedding`` (in place).

    The computation is unchanged (an Identity node); ``model.json`` gains the role
    ``embedding`` and the new ``sha256``. Returns False when it was there already.
    """
    return add_output(folder, "embedding", lambda model, spec: onnx_edit.find_linear_head(
        model, spec["outputs"].get("probs", "probs")).embedding)
