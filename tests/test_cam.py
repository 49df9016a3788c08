"""The review panel's class activation map for a white cell on a real smear field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.models.registry import bundled_models

pytestmark = pytest.mark.skipif("wbc" not in bundled_models(), reason="no bundled WBC model")


def test_cell_cam_on_the_bundled_smear_field():
    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.samples import sample_path
    from napari_hemato.tasks import get_task

    row = pd.Series({"id": 1, "y": 190.0, "x": 880.0, "area_px": np.pi * 85.0**2})
    ann = AnnotationSet("instances", pd.DataFrame([row]), ["WBC"], image_path=str(sample_path("smear_field")))
    smear = get_task("smear")
    assert not smear.has_cam(row)  # no classifier call recorded for this row
    crop, cam = smear.cam(ann, row)
    assert crop.shape[0] == crop.shape[1] and crop.shape[2] == 3 and crop.shape[0] > 200
    assert cam.shape == crop.shape[:2] and 0.0 <= cam.min() and cam.max() <= 1.0
    h = cam.shape[0]
    yy, xx = np.indices(cam.shape)
    inner = (yy - h / 2) ** 2 + (xx - h / 2) ** 2 <= (0.5 * 170) ** 2  # the cell itself
    assert cam[inner].sum() / cam.sum() > 0.5  # the classifier looked at the cell
