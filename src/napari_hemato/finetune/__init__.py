"""Fine-tuning from a user's corrections in the base install (no torch, no reference data).

The fast path refits a model's last linear layer on embeddings the ONNX model itself
computes, plus a small replay of reference embeddings shipped with the model, and
writes the refit weights back into a copy of the ONNX graph: the result is an
ordinary model folder. See :mod:`napari_hemato.finetune.head` (the fit),
:mod:`napari_hemato.finetune.onnx_edit` (graph edits) and one module per task.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from napari_hemato.core.errors import HematoError

#: what can be fine-tuned in the base install, and by which function
FINETUNERS = {
    "wbc": "napari_hemato.finetune.wbc:finetune_wbc",
    "mitosis": "napari_hemato.finetune.mitosis:finetune_mitosis",
    "nuclei": "napari_hemato.finetune.nuclei:finetune_nuclei",
    "smear": "napari_hemato.finetune.smear:finetune_smear",
}


def finetune(kind: str, data, out, **options):
    """Fine-tune the ``kind`` model (``wbc``, ``mitosis``, ``nuclei``, ``smear``) on the corrections in ``data``."""
    if kind not in FINETUNERS:
        raise HematoError(f"nothing to fine-tune called {kind!r}; choose from {', '.join(FINETUNERS)}")
    module, name = FINETUNERS[kind].split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn([Path(d) for d in ([data] if isinstance(data, (str, Path)) else data)], Path(out), **options)
