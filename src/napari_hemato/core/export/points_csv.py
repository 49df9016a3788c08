"""Points CSV (mitosis counts), plus the table <-> text helpers every format shares.

:func:`export_points_csv` writes one row per object with columns
``id, y_px, x_px, y_um, x_um, class, score, confidence, provenance, reviewed,
prob_*`` (µm empty when the pixel size is unknown). Floats are written with
their shortest exact representation and parsed back exactly, so values
survive the round-trip bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from napari_hemato.core import table as table_io
from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination

__all__ = ["export_points_csv", "import_points_csv"]


FORMAT_VERSION = 1
POINT_COLUMNS = ["id", "y_px", "x_px", "y_um", "x_um", "class", "score", "confidence",
                 "provenance", "reviewed"]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]
_CANONICAL = {**table_io.ID_DTYPES, "reviewed": "bool"}


# -- shared helpers --------------------------------------------------------------------------


def class_color(name, class_names) -> list[int]:
    """A stable RGB colour per class (palette by class index, hash otherwise)."""
    names = list(class_names)
    if name in names:
        return list(PALETTE[names.index(name) % len(PALETTE)])
    if name == "unassigned" or name is None:
        return [160, 160, 160]
    h = zlib.crc32(str(name).encode())
    return [64 + (h >> s & 0x7F) for s in (0, 8, 16)]


def iter_objects(labels: np.ndarray) -> Iterator[tuple[int, tuple[slice, slice], np.ndarray]]:
    """``(value, (rows, cols), mask)`` for each non-zero label, its mask cropped to its bbox."""
    values, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape)
    if values.size and values[0] != 0:  # no background: keep 0 free for find_objects
        values, compact = np.r_[0, values], compact + 1
    for k, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is not None:
            yield int(values[k]), box, compact[box] == k


def json_value(value):
    """A table cell as a JSON value (NaN and missing become None)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value if isinstance(value, str) else str(value)


def prob_columns(table: pd.DataFrame) -> list[str]:
    """The ``prob_<CLASS>`` columns of a table, in order."""
    return [c for c in table.columns if str(c).startswith("prob_")]


def restore_table(rows, columns: list[str], dtypes: dict | None = None) -> pd.DataFrame:
    """Rows (dicts or a frame) as a table with ``columns`` in order and ``dtypes`` restored."""
    if isinstance(rows, pd.DataFrame):
        frame = rows.reindex(columns=columns).reset_index(drop=True)
    else:
        frame = pd.DataFrame.from_records(list(rows), columns=columns)
    return table_io.restore_dtypes(frame, dtypes, canonical=_CANONICAL)


def write_table_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table without its index; floats in shortest round-trip form."""
    table.to_csv(path, index=False, na_rep="")


def read_table_csv(path: str | os.PathLike, dtypes: dict | None = None) -> pd.DataFrame:
    """:func:`napari_hemato.core.table.read_table_csv`, failing as an :class:`ExportError`."""
    from napari_hemato.core.export import _atomic as g

    try:
        table = table_io.read_table_csv(g.check_file_size(path), dtypes)
    except ExportError:
        raise
    except (OSError, ValueError, TypeError, pd.errors.ParserError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ExportError(f"cannot read table {path}: {detail}") from None
    g.check_count(len(table), path, "rows")
    return table


def header(ann: AnnotationSet) -> dict:
    """JSON description of everything but the rows and pixels of ``ann``."""
    meta = _plain(json.loads(json.dumps(ann.metadata, default=str)))
    return {
        "format_version": FORMAT_VERSION,
        "kind": ann.kind,
        "class_names": [str(c) for c in ann.class_names],
        "origin": [int(v) for v in ann.origin],
        "shape": None if ann.labels is None else [int(v) for v in ann.labels.shape],
        "mpp": None if ann.mpp is None else float(ann.mpp),
        "image_path": None if ann.image_path is None else str(ann.image_path),
        "image_shape": None if ann.image_shape is None else [int(v) for v in ann.image_shape],
        "columns": [str(c) for c in ann.table.columns],
        "dtypes": {str(c): str(t) for c, t in ann.table.dtypes.items()},
        "metadata": meta,
    }


def _plain(obj):
    """JSON data with non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def from_header(head: dict, table: pd.DataFrame, labels: np.ndarray | None) -> AnnotationSet:
    """The :class:`AnnotationSet` described by :func:`header`."""
    shape = head.get("image_shape")
    return AnnotationSet(
        kind=head.get("kind", "instances" if labels is not None else "points"),
        table=table,
        class_names=list(head.get("class_names") or []),
        labels=labels,
        origin=tuple(int(v) for v in head.get("origin") or (0, 0)),
        mpp=head.get("mpp"),
        image_path=head.get("image_path"),
        image_shape=None if shape is None else tuple(int(v) for v in shape),
        metadata=dict(head.get("metadata") or {}),
    )


def class_names_from(table: pd.DataFrame) -> list[str]:
    """Class names from ``prob_*`` columns, else the sorted classes present."""
    names = [c[len("prob_"):] for c in prob_columns(table)]
    if names or "class" not in table.columns:
        return names
    return sorted({str(c) for c in table["class"].dropna()} - {"unassigned"})


# -- the points CSV format -------------------------------------------------------------------


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
