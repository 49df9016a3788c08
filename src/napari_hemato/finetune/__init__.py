"""Fine-tuning from a user's corrections in the base install (no torch, no reference data).

The fast path refits a model's last linear layer on embeddings the ONNX model itself
computes, plus a small replay of reference embeddings shipped with the model, and
writes the refit weights back into a copy of the ONNX graph: the result is an
ordinary model folder. See :mod:`napari_hemato.finetune.head` (the fit),
:mod:`napari_hemato.finetune.onnx_edit` (graph edits) and one module per task.
"""
