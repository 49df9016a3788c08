"""Helpers every export format shares: table <-> text, object iteration, headers, colours.

Floats are written with their shortest exact representation and parsed back
exactly, so values survive a round trip bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage

from napari_hemato.core import table as table_io
from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError

FORMAT_VERSION = 1
_CANONICAL = {**table_io.ID_DTYPES, "reviewed": "bool"}


def class_color(name, class_names=()) -> list[int]:
    """The class's RGB colour in every export: the viewer's (:mod:`napari_hemato.core.class_colors`),
    so a QuPath or napari-ome-zarr user sees the colours the reviewer saw."""
    from napari_hemato.core.class_colors import class_color as viewer_color

    if name is None:
        name = "unassigned"
    return list(viewer_color(str(name)))


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
