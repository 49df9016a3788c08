"""Points CSV (mitosis counts): one row per point, in px and µm.

:func:`export_points_csv` writes one row per object with columns
``id, y_px, x_px, y_um, x_um, class, score, confidence, provenance, reviewed,
prob_*`` (µm empty when the pixel size is unknown). Floats are written with
their shortest exact representation and parsed back exactly, so values
survive the round-trip bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    class_names_from,
    prob_columns,
    read_table_csv,
    restore_table,
    write_table_csv,
)

__all__ = ["export_points_csv", "import_points_csv"]


POINT_COLUMNS = ["id", "y_px", "x_px", "y_um", "x_um", "class", "score", "confidence",
                 "provenance", "reviewed"]
def export_points_csv(annotations: AnnotationSet, path: str | os.PathLike, *,
                      overwrite: bool = False, base_dir: str | os.PathLike | None = None) -> Path:
    """Write object positions (e.g. mitoses) as a CSV in level-0 pixels and µm.

    Parameters
    ----------
    annotations : AnnotationSet
        Points or instances (their centroids are written).
    path : path
        The CSV file to write.
    overwrite : bool
        Replace an existing file.
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> export_points_csv(mitoses, "mitoses.csv")  # doctest: +SKIP
    PosixPath('.../mitoses.csv')
    >>> import_points_csv("mitoses.csv").table[["y", "x"]]  # doctest: +SKIP
    """
    table = annotations.table
    n = len(table)
    if not {"y", "x"} <= set(table.columns):
        raise ExportError(f"cannot write {path}: the table has no y, x columns")
    out = pd.DataFrame(index=pd.RangeIndex(n))
    out["id"] = table["id"].to_numpy() if "id" in table else np.arange(1, n + 1)
    out["y_px"] = table["y"].to_numpy()
    out["x_px"] = table["x"].to_numpy()
    mpp = annotations.mpp
    for ax in "yx":
        if mpp is None:
            out[f"{ax}_um"] = np.full(n, np.nan)
        else:
            um = table[f"{ax}_um"] if f"{ax}_um" in table else table[ax] * mpp
            out[f"{ax}_um"] = np.asarray(um, np.float64)
    for col in POINT_COLUMNS[5:] + prob_columns(table):
        out[col] = table[col].to_numpy() if col in table else np.nan
    dest = check_destination(path, overwrite=overwrite, base_dir=base_dir)
    with atomic_outputs([dest], overwrite=overwrite) as (tmp,):
        write_table_csv(out, tmp)
    return dest


def import_points_csv(path: str | os.PathLike, *, mpp: float | None = None,
                      image_path: str | None = None) -> AnnotationSet:
    """Read a points CSV written by :func:`export_points_csv` (or by hand).

    Parameters
    ----------
    path : path
        CSV with at least ``y_px, x_px`` (or ``y, x``) columns.
    mpp : float, optional
        Pixel size; by default estimated from the ``*_um`` columns.
    image_path : str, optional
        Recorded as the image the points belong to.

    Returns
    -------
    AnnotationSet
        ``kind="points"``; table columns ``id, y, x, y_um, x_um, class,
        confidence, score, prob_*..., provenance, reviewed``.

    Examples
    --------
    >>> pts = import_points_csv("mitoses.csv")  # doctest: +SKIP
    >>> len(pts.table), pts.mpp  # doctest: +SKIP
    (12, 0.25)
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(path, "points CSV", _read_points_csv, mpp=mpp, image_path=image_path)


def _read_points_csv(path, *, mpp, image_path) -> AnnotationSet:
    """:func:`import_points_csv`, checking every value a hostile file could abuse."""
    from napari_hemato.core.export import _atomic as g

    frame = read_table_csv(path)
    frame = frame.rename(columns={"y_px": "y", "x_px": "x"})
    written_ids = "id" in frame
    if not {"y", "x"} <= set(frame.columns):
        raise ExportError(f"{path}: needs y_px and x_px columns, found {list(frame.columns)}")
    n = len(frame)
    if "id" not in frame:
        frame["id"] = np.arange(1, n + 1, dtype=np.int64)
    if mpp is None and n and "y_um" in frame and frame["y_um"].notna().any():
        ratio = np.concatenate([(frame[f"{a}_um"] / frame[a]).to_numpy() for a in "yx"])
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        mpp = float(f"{np.median(ratio):.12g}") if ratio.size else None
    probs = prob_columns(frame)
    columns = ["id", "y", "x", "y_um", "x_um", "class", "confidence", "score", *probs,
               "provenance", "reviewed"]
    extra = [c for c in frame.columns if c not in columns]
    table = restore_table(frame, columns + extra, {"y": "float64", "x": "float64",
                                                   "y_um": "float64", "x_um": "float64"})
    yx = table[["y", "x"]].to_numpy(np.float64)
    bad = ~np.isfinite(yx).all(axis=1) | (np.abs(yx) > 2**31).any(axis=1)
    if bad.any():
        raise ExportError(f"{path}: row {int(np.argmax(bad)) + 1} has no finite y_px, x_px")
    # the table reader casts ids to integers (1.5 would become 1): check them as written
    g.check_ids(pd.read_csv(path, usecols=["id"])["id"] if written_ids else table["id"], path,
                label=False)
    return AnnotationSet(kind="points", table=table, class_names=class_names_from(table),
                         mpp=mpp, image_path=image_path, metadata={"source": str(path)})
