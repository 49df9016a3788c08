"""The per-object table: one schema for layer features, CSV exports and training.

Columns (coordinates in level-0 pixels of the input, and in µm):

``id, y, x, y_um, x_um, bbox_y0, bbox_x0, bbox_y1, bbox_x1, area_px, area_um2,
class, confidence, score, prob_<CLASS>..., model, model_version, provenance,
reviewed, tile``

For instances, ``area_px`` is the object's pixel count in the level-0 label
image the user gets (label TIFF, exports, layers), and ``bbox_*`` the half-open
level-0 box of those pixels, always inside the image (and ROI), also when the
model worked on a resampled grid; ``area_um2`` is ``area_px × (level-0 µm/px)²``.
A point's box is its nominal disc, clipped to the ROI.

``confidence`` is the probability of the chosen class; ``score`` is the
detection score (mean foreground probability of an instance, heatmap peak of a
point); ``provenance`` is ``auto`` for model output (``corrected``/``manual``
after review); ``reviewed`` is False until a person confirms the object.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_hemato.core.geometry import WorkGrid
from napari_hemato.core.objects import TileOutput

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from napari_hemato.core.spec import ModelSpec

GEOMETRY_COLUMNS = ["id", "y", "x", "y_um", "x_um", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
                    "area_px", "area_um2"]
TAIL_COLUMNS = ["model", "model_version", "provenance", "reviewed", "tile"]


def table_columns(class_names) -> list[str]:
    """Column order of the object table for a model's classes."""
    return [*GEOMETRY_COLUMNS, "class", "confidence", "score",
            *(f"prob_{c}" for c in class_names), *TAIL_COLUMNS]


def tile_table(out: TileOutput, grid: WorkGrid, spec: ModelSpec) -> pd.DataFrame:
    """Convert one tile's raw (work-grid) columns into final table rows."""
    c = out.columns
    n = out.n_objects
    names = list(spec.class_names)
    yx0 = grid.to_level0(np.column_stack([c["y"], c["x"]])) if n else np.zeros((0, 2))
    ry, rx = grid.roi[:2]
    # instances: pixel count in the level-0 label image; points (and tiles of older runs):
    # the work-grid area scaled to level 0
    area = np.asarray(c.get("area_level0", np.asarray(c["area_px"]) * grid.factor**2), np.float64)
    prob = np.asarray(c["prob"], np.float64)
    prob = prob[:, None] if prob.ndim == 1 else prob
    score = np.asarray(c["score"], np.float64)
    if prob.shape[1] == len(names) and "class_probs" in spec.outputs:
        best = prob.argmax(axis=1) if n else np.zeros(0, int)
        if "rule_class" in c:  # a stain rule's class (core.stain_rule); -1: the argmax
            best = np.where(np.asarray(c["rule_class"]) >= 0, c["rule_class"], best).astype(int)
        confidence = prob[np.arange(n), best] if n else np.zeros(0)
    else:  # single-class model: the class probability is the detection score
        prob = np.repeat(score[:, None], len(names), axis=1) if len(names) == 1 else prob
        best = np.zeros(n, int)
        confidence = score
    frame = {
        "id": np.asarray(c["id"], np.int64),
        "y": yx0[:, 0],
        "x": yx0[:, 1],
        "y_um": yx0[:, 0] * grid.mpp0,
        "x_um": yx0[:, 1] * grid.mpp0,
        # the level-0 pixels the work box maps to (see WorkGrid.level0_start): inside the ROI
        "bbox_y0": ry + grid.level0_start(c["bbox_y0"], 0),
        "bbox_x0": rx + grid.level0_start(c["bbox_x0"], 1),
        "bbox_y1": ry + grid.level0_start(c["bbox_y1"], 0),
        "bbox_x1": rx + grid.level0_start(c["bbox_x1"], 1),
        "area_px": area,
        "area_um2": area * grid.mpp0**2,
        "class": np.asarray(names, dtype=object)[best] if n else np.zeros(0, object),
        "confidence": confidence,
        "score": score,
    }
    for k, name in enumerate(names):
        frame[f"prob_{name}"] = prob[:, k] if n else np.zeros(0)
    frame.update(
        model=spec.name,
        model_version=spec.version,
        provenance="auto",
        reviewed=False,
        tile=out.index,
    )
    return pd.DataFrame(frame, index=pd.RangeIndex(n))[table_columns(names)]


STRING_COLUMNS = ("class", "class_auto", "cell_type", "model", "model_version", "provenance")
# pandas 3 parses floats exactly by default (and deprecates the option)
_EXACT = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
#: columns that are integers whenever they are complete
ID_DTYPES = {"id": "int64", "bbox_y0": "int64", "bbox_x0": "int64", "bbox_y1": "int64",
             "bbox_x1": "int64"}


def restore_dtypes(frame: pd.DataFrame, dtypes: dict | None = None, *,
                   canonical: dict = ID_DTYPES) -> pd.DataFrame:
    """Cast ``frame``'s complete ``canonical`` columns, then any ``dtypes`` given, in place.

    A column that will not cast keeps its dtype (logged), so a foreign table still loads.
    """
    wanted = {c: t for c, t in canonical.items() if c in frame and frame[c].notna().all()}
    wanted.update(dtypes or {})
    for col, dtype in wanted.items():
        if col in frame.columns and str(frame[col].dtype) != dtype:
            try:
                frame[col] = frame[col].astype(dtype)
            except (TypeError, ValueError) as exc:
                log.warning("column %r kept as %s (not %s): %s", col, frame[col].dtype, dtype, exc)
    return frame


def read_table_csv(path, dtypes: dict | None = None) -> pd.DataFrame:
    """Read an object table CSV exactly as it was written.

    The one reader of every table this package writes (sidecars, exports,
    ``analyze --table``): floats parse to the same bits, class-like columns stay
    strings (a class called ``"1"`` or ``"NA"`` is not a number or a missing
    value), ``reviewed`` is boolean, ids and boxes are integers, and ``dtypes``
    (a header's ``{column: dtype}``) restores the rest.
    """
    head = pd.read_csv(path, nrows=0).columns
    if hasattr(path, "seek"):  # a buffer: read it again from its start
        path.seek(0)
    strings = [c for c in head if c in STRING_COLUMNS
               or str((dtypes or {}).get(c, "")) in ("object", "str", "string")]
    table = pd.read_csv(path, dtype={c: str for c in strings},
                        keep_default_na=False, na_values=[""], **_EXACT)
    for c in strings:  # a header's own string dtype wins; else plain strings, "" for missing
        declared = (dtypes or {}).get(c)
        table[c] = table[c].astype(declared) if declared else table[c].fillna("").astype(object)
    if "reviewed" in table:
        table["reviewed"] = table["reviewed"].astype(str).str.lower().isin(["true", "1"])
    rest = {c: t for c, t in (dtypes or {}).items() if c not in strings and c != "reviewed"}
    return restore_dtypes(table, rest)
