"""Level-0 geometry of painted objects, measured on their label image (vectorised).

The one measurement of an object that a person drew or changed: the review's paint,
merge and split, and the edit window's save. (Model objects get theirs from the
engine, :mod:`napari_hemato.core.objects`.)
"""

from __future__ import annotations

import numpy as np


def measure_labels(labels: np.ndarray, ids, origin=(0, 0), mpp: float | None = None) -> dict:
    """``{column: array}`` of the table's geometry columns for ``ids`` (sorted, as returned in
    ``"id"``) from ``labels`` (level 0, ``labels[0, 0]`` is pixel ``origin``); ids without a
    pixel are left out. One pass over the image, whatever the number of ids.

    Examples
    --------
    >>> lab = np.zeros((4, 5), np.uint32); lab[1:3, 1:4] = 7
    >>> g = measure_labels(lab, [7, 9], origin=(10, 20), mpp=0.5)
    >>> g["id"].tolist(), g["y"].tolist(), g["bbox_x1"].tolist(), g["area_um2"].tolist()
    ([7], [11.5], [24], [1.5])
    """
    ids = np.unique(np.asarray(list(ids), np.int64))
    ys, xs = np.nonzero(np.isin(labels, ids))
    values = labels[ys, xs].astype(np.int64)
    ids = np.unique(values)
    k = np.searchsorted(ids, values)
    n = np.bincount(k, minlength=ids.size).astype(np.float64)
    ymin, xmin = np.full(ids.size, np.iinfo(np.int64).max), np.full(ids.size, np.iinfo(np.int64).max)
    ymax, xmax = np.full(ids.size, -1, np.int64), np.full(ids.size, -1, np.int64)
    np.minimum.at(ymin, k, ys)
    np.minimum.at(xmin, k, xs)
    np.maximum.at(ymax, k, ys)
    np.maximum.at(xmax, k, xs)
    oy, ox = int(origin[0]), int(origin[1])
    mpp = np.nan if mpp is None else float(mpp)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.bincount(k, ys, ids.size) / n + oy
        x = np.bincount(k, xs, ids.size) / n + ox
    return {"id": ids, "y": y, "x": x, "y_um": y * mpp, "x_um": x * mpp,
            "bbox_y0": ymin + oy, "bbox_x0": xmin + ox, "bbox_y1": ymax + 1 + oy,
            "bbox_x1": xmax + 1 + ox, "area_px": n, "area_um2": n * mpp**2}


def write_geometry(table, values: dict) -> None:
    """Put :func:`measure_labels`' ``values`` into ``table`` (indexed by id), in place; a
    geometry column of object dtype (blank rows of a run that found nothing) becomes float."""
    for col, v in values.items():
        if col in table and col != "id":
            if table[col].dtype == object:
                table[col] = table[col].astype(np.float64)
            table.loc[values["id"], col] = v
