"""A heatmap net's ``features`` output and the per-pixel features its last layer reads.

A points model's heatmap is ``sigmoid(upsample(conv1x1(features))[channel])``. Both the
1×1 convolution and the linear (half-pixel) upsampling are linear and the upsampling's
weights sum to one, so at every heatmap pixel the logit is ``w · f + b`` where ``f`` is
the features *upsampled* to that pixel (:func:`sample_features`): a per-pixel logistic
regression over the feature channels, refit by :mod:`napari_hemato.finetune.mitosis`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.embedding import add_output


def add_features_output(folder: str | Path, heatmap_role: str = "heatmap") -> bool:
    """Expose the input of the last 1×1 conv under a model's ``heatmap_role`` output (a
    points model's ``heatmap``, a segmenter's ``foreground``) as output ``features`` (in place).

    The computation is unchanged (an Identity node); ``model.json`` gains the role
    ``features`` (computed only on request) and the new ``sha256``. Returns False when
    it was there already.
    """
    return add_output(folder, "features", lambda model, spec: onnx_edit.find_heatmap_head(
        model, spec["outputs"].get(heatmap_role, heatmap_role)).features)


def sample_features(fmap: np.ndarray, yx: np.ndarray, upsample: int) -> np.ndarray:
    """The features ``fmap`` (D, h, w) linearly upsampled by ``upsample`` (ONNX Resize,
    half-pixel, edges clamped), at heatmap pixels ``yx`` (n, 2) -> (n, D) float64.

    Examples
    --------
    >>> f = np.arange(4.0).reshape(1, 2, 2)
    >>> sample_features(f, np.array([[0, 0], [3, 3], [1, 2]]), 2)[:, 0].tolist()
    [0.0, 3.0, 1.25]
    """
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    _, h, w = fmap.shape
    src = (yx + 0.5) / upsample - 0.5
    sy = np.clip(src[:, 0], 0, h - 1)
    sx = np.clip(src[:, 1], 0, w - 1)
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (sy - y0)[:, None], (sx - x0)[:, None]
    f = np.asarray(fmap, np.float64)
    return ((f[:, y0, x0].T * (1 - dx) + f[:, y0, x1].T * dx) * (1 - dy)
            + (f[:, y1, x0].T * (1 - dx) + f[:, y1, x1].T * dx) * dy)


@dataclass
class HeatmapFeatures:
    """A points model run for its features: the predictor and where its head is."""

    predictor: object  # OnnxPredictor
    head: onnx_edit.HeatmapHead
    weight: np.ndarray  # (D,) the heatmap channel's weights
    bias: float

    @classmethod
    def load(cls, folder: str | Path, *, threads: int | None = None) -> HeatmapFeatures:
        from napari_hemato.models.onnx_backend import OnnxPredictor

        # the head refit edits the float network
        predictor = OnnxPredictor(folder, threads=threads, precision="float")
        spec = predictor.spec
        if "features" not in spec.outputs:
            raise HematoError(f"{spec.folder}: model {spec.name!r} has no 'features' output "
                              "(napari_hemato.finetune.features.add_features_output adds it)")
        model = onnx_edit.load(spec.onnx_path)
        head = onnx_edit.find_heatmap_head(model, spec.outputs["heatmap"])
        w = onnx_edit.initializer(model, head.weight)[head.channel, :, 0, 0].astype(np.float64)
        b = float(onnx_edit.initializer(model, head.bias)[head.channel])
        return cls(predictor, head, w, b)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(heatmap (N, H, W), features (N, D, h, w))`` of RGB uint8 windows (N, H, W, 3)."""
        out = self.predictor.predict(np.asarray(images, np.uint8), roles=["heatmap", "features"])
        return out["heatmap"][:, 0], out["features"]

    def logit(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight + self.bias
