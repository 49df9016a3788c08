"""Class activation map of one white cell, for the review panel (no Qt)."""

from __future__ import annotations

import functools
import math

import numpy as np

from napari_hemato.core.annotations import AnnotationSet


@functools.lru_cache(maxsize=2)
def _classifier(model_dir: str | None):
    from napari_hemato.models.cell_classifier import CellClassifier

    return CellClassifier(model_dir)


def cell_cam(ann: AnnotationSet, row, *, model_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(crop, cam)`` for the WBC in ``row``: the crop the classifier saw and its CAM in [0, 1].

    The classifier is the bundled WBC model unless ``model_dir`` is given
    (cached, so clicking through cells does not reload it).
    """
    from napari_hemato.core.slide import open_slide, to_rgb8

    if not ann.image_path:
        raise ValueError("the annotation set does not say which image it came from")
    classifier = _classifier(model_dir)
    context = float(classifier.spec.preprocess.get("context", 1.5))
    diameter = 2.0 * math.sqrt(max(float(row["area_px"]), 1.0) / math.pi)
    half = int(math.ceil(diameter * context / 2))
    cy, cx = int(round(float(row["y"]))), int(round(float(row["x"])))
    with open_slide(ann.image_path, mpp=ann.mpp) as slide:
        crop = to_rgb8(slide.read_region(0, cy - half, cx - half, cy + half + 1, cx + half + 1))
    _, cams = classifier.classify_crops([crop], [diameter])
    cam = np.asarray(cams[0], np.float32)
    if cam.shape != crop.shape[:2]:
        from skimage.transform import resize

        cam = resize(cam, crop.shape[:2], order=1)
    return crop, cam
