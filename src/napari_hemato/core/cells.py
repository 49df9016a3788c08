"""Second stage of the smear task: classify every white cell the detector found.

The smear model gives each cell a type (RBC, WBC, Platelets). Each WBC is then
cropped around its centroid, normalised as the classifier's spec says (by its own
segmented size, or at the field's pixel size for ``preprocess["scale"] == "red-cell"``
models: :func:`window_context`), and classified into the 11 PBC classes. The table keeps the detector's call in
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


def equivalent_diameter(area_px):
    """The diameter (px) of the disc of ``area_px`` (at least 1 px²); a float, or an array for an
    array of areas."""
    d = 2.0 * np.sqrt(np.maximum(np.asarray(area_px, float), 1.0) / np.pi)
    return float(d) if d.ndim == 0 else d


def cell_types(table: pd.DataFrame) -> pd.Series:
    """Each object's cell type (RBC, WBC, Platelets): ``cell_type`` once the white cells are
    classified (``class`` then holds their subtype), else the detector's ``class``."""
    return table["cell_type"] if "cell_type" in table else table["class"]


def cell_crop(slide, y: float, x: float, area_px: float, context: float) -> tuple[np.ndarray, float]:
    """``(crop, diameter)``: the level-0 square the classifier's window covers, and the
    cell's equivalent diameter (px).

    The classifier cuts a window of side ``diameter * context`` around the crop's
    centre (:func:`napari_hemato.models.cell_classifier.cell_window`); the crop is that
    window plus one pixel, centred on the cell, white outside the image. The smear
    task's second stage and the review panel's CAM both read cells through this.
    """
    from napari_hemato.core.slide import to_rgb8

    diameter = equivalent_diameter(area_px)
    half = int(math.ceil(diameter * context / 2)) + 1
    cy, cx = int(round(float(y))), int(round(float(x)))
    crop = slide.read_region(0, cy - half, cx - half, cy + half + 1, cx + half + 1, fill=255)
    return to_rgb8(crop), diameter


#: crop side / diameter read around a cell for the classifier's red-cell ruler (pixel size unknown)
RULER_CONTEXT = 6.0


def window_context(preprocess: dict, area_px: float, mpp: float | None) -> float:
    """Crop side / cell diameter a classifier of ``preprocess`` needs around a cell.

    Self-scale models: ``context``. Red-cell-scale models: the physical window
    (``window_um / mpp``) when the pixel size is known, else a neighbourhood of
    :data:`RULER_CONTEXT` diameters for the red-cell ruler.

    Examples
    --------
    >>> window_context({"context": 1.5}, 5000.0, 0.1)
    1.5
    >>> round(window_context({"context": 1.8, "scale": "red-cell", "window_um": 25.0}, math.pi * 50**2, 0.1), 2)
    2.5
    """
    context = float(preprocess.get("context", 1.5))
    if preprocess.get("scale", "self") == "self":
        return context
    if not mpp:
        return max(context, RULER_CONTEXT)
    diameter = equivalent_diameter(area_px)
    return max(context, float(preprocess["window_um"]) / float(mpp) / diameter)


def stated_mpp(slide) -> float | None:
    """The slide's µm/px when the file or the user states it; None when it was estimated.

    A smear field's pixel size measured by the smear model's red cells
    (``mpp_source == "red-cells"``, :mod:`napari_hemato.core.smear_scale`) follows that
    model's own reference red cell; on BCCD it reads ~0.84x the WBC classifier's red-cell
    ruler (23 fields), so red-cell-scale classifiers measure such fields with their own
    ruler, the one they were trained with.
    """
    mpp = getattr(slide, "mpp", None)
    if not mpp or getattr(slide, "mpp_source", None) == "red-cells":
        return None
    return float(mpp)


def _crops(slide, rows: pd.DataFrame, preprocess: dict, mpp: float | None) -> Iterator[tuple[np.ndarray, float]]:
    for y, x, area in rows[["y", "x", "area_px"]].itertuples(index=False):
        yield cell_crop(slide, y, x, area, window_context(preprocess, area, mpp))


def classify_wbcs(table: pd.DataFrame, slide, classifier, *, batch_size: int = 64,
                  mpp: float | None = None) -> pd.DataFrame:
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
        :class:`napari_hemato.models.cell_classifier.CellClassifier`); a red-cell-scale
        classifier also gets the slide's stated pixel size (:func:`stated_mpp`; None: its
        red-cell ruler reads each cell's neighbourhood).
    mpp : float, optional
        The pixel size a red-cell-scale classifier is to use when the slide states none (its
        own ruler's reading of the whole field, :func:`napari_hemato.tasks.smear.classifier_field_mpp`).
    """
    out = table.copy()
    names = list(classifier.spec.class_names)
    if "cell_type" not in out:
        out.insert(out.columns.get_loc("class"), "cell_type", out["class"].astype(object))
    for name in names:
        out[f"prob_{name}"] = np.nan
    wbc = out.index[cell_types(out) == WBC]
    if len(wbc) == 0:
        return out
    preprocess = dict(classifier.spec.preprocess)
    mpp = stated_mpp(slide) or (None if mpp is None else float(mpp))
    # self-scale classifiers take no pixel size (nor need one: the crop is diameter x context)
    kwargs = {} if preprocess.get("scale", "self") == "self" else {"mpp": mpp}
    probs = []
    rows = out.loc[wbc]
    for start in range(0, len(rows), batch_size):
        chunk = list(_crops(slide, rows.iloc[start : start + batch_size], preprocess, mpp))
        p, _ = classifier.classify_crops([c for c, _ in chunk], [d for _, d in chunk], **kwargs)
        probs.append(np.asarray(p, np.float64))
    probs = np.concatenate(probs)
    best = probs.argmax(axis=1)
    out.loc[wbc, "class"] = np.asarray(names, dtype=object)[best]
    out.loc[wbc, "confidence"] = probs[np.arange(len(wbc)), best]
    for k, name in enumerate(names):
        out.loc[wbc, f"prob_{name}"] = probs[:, k]
    return out
