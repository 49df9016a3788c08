"""Second stage of the smear task: classify every white cell the detector found.

The smear model gives each cell a type (RBC, WBC, Platelets). Each WBC is then
cropped around its centroid, normalised by its own segmented size, and
classified into the 11 PBC classes. The table keeps the detector's call in
``cell_type`` (with ``prob_RBC``, ``prob_WBC``, ``prob_Platelets``); for WBCs,
``class`` becomes the subtype, ``confidence`` its probability, and
``prob_SNE`` … ``prob_PLT`` hold the full vector (empty for other cells).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd

WBC = "WBC"


def cell_crop(slide, y: float, x: float, area_px: float, context: float) -> tuple[np.ndarray, float]:
    """``(crop, diameter)``: the level-0 square the classifier's window covers, and the
    cell's equivalent diameter (px).

    The classifier cuts a window of side ``diameter * context`` around the crop's
    centre (:func:`napari_hemato.models.cell_classifier.cell_window`); the crop is that
    window plus one pixel, centred on the cell, white outside the image. The smear
    task's second stage and the review panel's CAM both read cells through this.
    """
    from napari_hemato.core.slide import to_rgb8

    diameter = 2.0 * math.sqrt(max(float(area_px), 1.0) / math.pi)
    half = int(math.ceil(diameter * context / 2)) + 1
    cy, cx = int(round(float(y))), int(round(float(x)))
    crop = slide.read_region(0, cy - half, cx - half, cy + half + 1, cx + half + 1, fill=255)
    return to_rgb8(crop), diameter


def _crops(slide, rows: pd.DataFrame, context: float) -> Iterator[tuple[np.ndarray, float]]:
    for y, x, area in rows[["y", "x", "area_px"]].itertuples(index=False):
        yield cell_crop(slide, y, x, area, context)


def classify_wbcs(table: pd.DataFrame, slide, classifier, *, batch_size: int = 64) -> pd.DataFrame:
    """Add WBC subtypes to a smear table (a new table is returned).

    Parameters
    ----------
    table : DataFrame
        Smear objects (``class`` in RBC / WBC / Platelets, level-0 ``y``, ``x``, ``area_px``).
    slide : Slide
        The image the table was computed on.
    classifier
        Anything with ``spec.class_names``, ``spec.preprocess`` and
        ``classify_crops(crops, diameters) -> (probs, cams)`` (see
        :class:`napari_hemato.models.cell_classifier.CellClassifier`).
    """
    out = table.copy()
    names = list(classifier.spec.class_names)
    if "cell_type" not in out:
        out.insert(out.columns.get_loc("class"), "cell_type", out["class"].astype(object))
    for name in names:
        out[f"prob_{name}"] = np.nan
    wbc = out.index[out["cell_type"] == WBC]
    if len(wbc) == 0:
        return out
    context = float(classifier.spec.preprocess.get("context", 1.5))
    probs = []
    rows = out.loc[wbc]
    for start in range(0, len(rows), batch_size):
        chunk = list(_crops(slide, rows.iloc[start : start + batch_size], context))
        p, _ = classifier.classify_crops([c for c, _ in chunk], [d for _, d in chunk])
        probs.append(np.asarray(p, np.float64))
    probs = np.concatenate(probs)
    best = probs.argmax(axis=1)
    out.loc[wbc, "class"] = np.asarray(names, dtype=object)[best]
    out.loc[wbc, "confidence"] = probs[np.arange(len(wbc)), best]
    for k, name in enumerate(names):
        out.loc[wbc, f"prob_{name}"] = probs[:, k]
    return out
