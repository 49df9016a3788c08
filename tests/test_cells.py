"""The smear task's second stage: WBC subtypes added to the detector's table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.slide import slide_from_array
from napari_hemato.core.spec import ModelSpec
from napari_hemato.tasks.smear import differential

NAMES = ("SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT")


class FakeClassifier:
    """Says LY for dark crops, SNE otherwise; records the crops it saw."""

    spec = ModelSpec(name="fake-wbc", version="0", task="wbc", kind="classifier",
                     class_names=NAMES, outputs={"probs": "p"}, preprocess={"context": 1.5})

    def __init__(self):
        self.seen = []

    def classify_crops(self, crops, diameters=None):
        self.seen += list(zip([c.shape for c in crops], diameters, strict=True))
        probs = np.full((len(crops), 11), 0.01)
        for k, crop in enumerate(crops):
            h, w = crop.shape[:2]
            probs[k, 4 if crop[h // 2, w // 2].mean() < 100 else 0] = 0.9
        return probs / probs.sum(1, keepdims=True), [np.zeros(c.shape[:2]) for c in crops]


def test_classify_wbcs_only_touches_white_cells():
    from napari_hemato.core.cells import classify_wbcs

    image = np.full((200, 200, 3), 230, np.uint8)
    image[40:60, 40:60] = 50  # a dark WBC -> LY
    table = pd.DataFrame({
        "id": [1, 2, 3], "y": [49.5, 150.0, 100.0], "x": [49.5, 150.0, 20.0],
        "area_px": [400.0, 380.0, 60.0], "class": ["WBC", "WBC", "RBC"],
        "confidence": [0.9, 0.8, 0.95], "prob_RBC": [0.05, 0.1, 0.95],
    })
    fake = FakeClassifier()
    out = classify_wbcs(table, slide_from_array(image), fake)
    assert list(out["cell_type"]) == ["WBC", "WBC", "RBC"]
    assert list(out["class"]) == ["LY", "SNE", "RBC"]
    assert out.loc[0, "confidence"] == pytest.approx(0.9 / (0.9 + 0.1), rel=1e-6)
    assert np.isnan(out.loc[2, "prob_LY"]) and out.loc[0, "prob_LY"] > 0.8
    # crops are centred on the cell and sized from its area (diameter ~22.6 px)
    (shape, diameter), _ = fake.seen
    assert diameter == pytest.approx(2 * np.sqrt(400 / np.pi))
    # ... and hold the classifier's whole window (side diameter * context) around their centre
    from napari_hemato.models.cell_classifier import cell_window

    y0, x0, side = cell_window(((shape[0] - 1) / 2, (shape[1] - 1) / 2), diameter, 1.5)
    assert shape[0] == shape[1] and y0 >= 0 and x0 >= 0 and y0 + side <= shape[0]
    d = differential(out)
    assert d["wbc_total"] == 2 and d["counts"]["LY"] == 1 and d["rbc"] == 1
