"""With a real model on a real image, tiling changes (almost) nothing.

The bundled nuclei network's receptive field is covered by the halo, so the
only differences between tiled and untiled runs come from floating-point
summation order near tile borders; object-matching F1 must stay >= 0.99.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.models.registry import bundled_models

pytestmark = pytest.mark.skipif("nuclei" not in bundled_models(), reason="no bundled nuclei model")


def test_tiled_vs_untiled_f1_on_real_he(tmp_path, shared_data):
    from napari_hemato.core.engine import run
    from napari_hemato.core.metrics import instance_f1
    from napari_hemato.core.slide import open_slide
    from napari_hemato.models.onnx_backend import OnnxPredictor

    slide = open_slide(shared_data / "slides" / "cmu_small_region.svs")
    predictor = OnnxPredictor(bundled_models()["nuclei"])
    roi = (1400, 700, 2200, 1500)  # 800 x 800 px of tissue
    whole = run(slide, predictor, out=tmp_path / "whole.zarr", roi=roi, tile=2048)
    tiled = run(slide, predictor, out=tmp_path / "tiled.zarr", roi=roi, tile=max(predictor.spec.halo, 192))
    assert len(whole.plan) == 1 and len(tiled.plan) >= 4
    a, b = whole.labels()[:], tiled.labels()[:]
    n = len(np.unique(a)) - 1
    assert n > 150, f"only {n} nuclei found in tissue"
    scores = instance_f1(a, b, iou_threshold=0.5)
    assert scores["f1"] >= 0.99, scores
    assert len(tiled.table()) == len(np.unique(b)) - 1  # no duplicates, every object in the table
