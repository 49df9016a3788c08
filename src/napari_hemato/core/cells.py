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


def _crops(slide, rows: pd.DataFrame, margin: float) -> Iterator[tuple[np.ndarray, float]]:
    from napari_hemato.core.slide import to_rgb8

    for y, x, area in rows[["y", "x", "area_px"]].itertuples(index=False):
        diameter = 2.0 * math.sqrt(max(float(area), 1.0) / math.pi)
        r = int(math.ceil(diameter * margin / 2))
        cy, cx = int(round(y)), int(round(x))
        crop = slide.read_region(0, cy - r, cx - r, cy + r + 1, cx + r + 1, fill=255)
        yield to_rgb8(crop), diameter


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
    margin = 2.0 * float(classifier.spec.preprocess.get("context", 1.5))
    probs = []
    rows = out.loc[wbc]
    for start in range(0, len(rows), batch_size):
        chunk = list(_crops(slide, rows.iloc[start : start + batch_size], margin))
        p, _ = classifier.classify_crops([c for c, _ in chunk], [d for _, d in chunk])
        probs.append(np.asarray(p, np.float64))
    probs = np.concatenate(probs)
    best = probs.argmax(axis=1)
    out.loc[wbc, "class"] = np.asarray(names, dtype=object)[best]
    out.loc[wbc, "confidence"] = probs[np.arange(len(wbc)), best]
    for k, name in enumerate(names):
        out.loc[wbc, f"prob_{name}"] = probs[:, k]
    return out
