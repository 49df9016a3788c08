"""The WBC classifier's runtime contract: input normalisation and the ONNX export (spec + card)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_hemato.models.cell_classifier import CLASS_NAMES
from napari_hemato.train import loop
from napari_hemato.train.common import normalize as normalize_nchw
from napari_hemato.train.nets import TFLITE_NORMALIZATION, CamOutputs

VERSION = "0.3.0"


def normalize(batch_uint8_nhwc: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 / float [0, 255] NHWC -> normalised float32 NCHW (as ``ModelSpec.normalize``).

    Examples
    --------
    >>> normalize(np.full((1, 2, 2, 3), 127, np.uint8)).shape
    torch.Size([1, 3, 2, 2])
    """
    x = torch.as_tensor(np.asarray(batch_uint8_nhwc)).float().permute(0, 3, 1, 2)
    return normalize_nchw(x, TFLITE_NORMALIZATION).contiguous()


def export_model(net: nn.Module, out_dir: Path, *, size: int, context: float, extra: dict,
                 check_inputs: np.ndarray | None = None, name: str = "hemato-wbc-pbc11",
                 version: str = VERSION, temperature: float = 1.0, colour: str = "none",
                 scale: dict | None = None):
    """Write ``model.onnx`` (opset 17, dynamic batch, single file), ``model.json`` and a card.

    onnxruntime must agree with torch (max |Δ| < 1e-4 on probs, relative on
    the CAM) on ``check_inputs`` (uint8 NHWC) or a random batch. ``scale`` (the
    :meth:`~napari_hemato.models.window_scale.WindowScale.as_preprocess` keys) records a
    red-cell window in ``preprocess``; None or ``"self"``: no ``scale`` key (as before).
    """
    preprocess = {
        "context": context,
        "window": "square, side = cell diameter x context, centred on the cell",
        "diameter": "segmented cell's equivalent diameter (cell_classifier.estimate_cell_diameter) "
                    "or the caller's segmentation",
        "pad": "mirror (numpy symmetric) where the window leaves the image",
        "resize": "Pillow bilinear (antialiased when shrinking)",
        "colour": colour,
    }
    if scale and scale.get("scale", "self") != "self":
        preprocess.update(scale)
        preprocess["window"] = ("square, side = window_um / (µm per px), centred on the cell; µm/px from the "
                                "caller, else the red-cell ruler (red cell = rbc_um), else cell diameter x "
                                "context (window_scale.WindowScale)")
    if check_inputs is None or len(check_inputs) == 0:
        check_inputs = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    spec = dict(
        name=name, version=version, task="wbc", kind="classifier", class_names=CLASS_NAMES,
        outputs={"probs": "probs", "cam": "cam"}, mpp=None, tile=size, input_size=size,
        receptive_field_px=size // 2, max_object_um=20.0, channels="RGB", pad_value=255,
        input_name="image", normalization=dict(TFLITE_NORMALIZATION),
        preprocess=preprocess,
        extra=extra,
    )
    return loop.export_model(CamOutputs(net, temperature).eval(), out_dir, spec,
                             example=torch.zeros(1, 3, size, size),
                             check_inputs=[normalize(check_inputs[:64])], spatial=False)
