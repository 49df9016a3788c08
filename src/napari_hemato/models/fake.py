"""A local, deterministic fake predictor for tests and benchmarks without ONNX.

It marks dark pixels (stained nuclei or cells on a bright background) as
foreground after a box blur of radius ``receptive_field_px``: a pixel's output
depends only on a window of that radius, like a real convolutional network.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.spec import ModelSpec


def fake_spec(**overrides) -> ModelSpec:
    """A spec for :class:`DarkBlobPredictor` (override any field)."""
    fields = dict(
        name="fake-dark-blobs",
        version="0",
        task="nuclei",
        kind="instances",
        mpp=0.5,
        tile=256,
        max_object_um=20.0,
        receptive_field_px=2,
        class_names=("nucleus",),
        outputs={"foreground": "fg"},
        postprocess={"threshold": 0.5, "min_distance_um": 2.0, "min_area_um2": 4.0},
    )
    fields.update(overrides)
    return ModelSpec(**fields)


class DarkBlobPredictor:
    """Foreground = box-blurred darkness above ``level`` (0..1)."""

    def __init__(self, spec: ModelSpec | None = None, *, level: float = 0.45) -> None:
        self.spec = spec or fake_spec()
        self.level = level
        self.calls = 0

    def predict(
        self, batch: np.ndarray, *, cancel: CancelToken | None = None
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        size = 2 * self.spec.receptive_field_px + 1
        dark = 1.0 - batch.astype(np.float32).mean(axis=-1) / 255.0
        blurred = ndi.uniform_filter(dark, size=(1, size, size), mode="nearest")
        fg = 1.0 / (1.0 + np.exp(-20.0 * (blurred - self.level)))
        out: dict[str, np.ndarray] = {"foreground": fg[:, None].astype(np.float32)}
        if "heatmap" in self.spec.outputs:
            out = {"heatmap": fg[:, None].astype(np.float32)}
        if "class_probs" in self.spec.outputs:
            red = batch[..., 0].astype(np.float32) / 255.0
            p = ndi.uniform_filter(red, size=(1, size, size), mode="nearest")
            out["class_probs"] = np.stack([p, 1.0 - p], axis=1).astype(np.float32)
        return out
