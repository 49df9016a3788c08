"""Mitosis detection on H&E: points, the mitotic count per 10 HPF and per 2 mm², hotspot.

The count is over the area analysed (the tissue in the region, when the run had a
tissue mask); the hotspot is the square window of 10 HPF
holding most mitoses.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from napari_hemato.core.classes import REJECTED, UNASSIGNED, ClassHierarchy
from napari_hemato.tasks.base import Task

#: one high-power field; 10 HPF = 2.37 mm², the area used by the MIDOG challenge
HPF_MM2 = 0.237
EXCLUDED = (REJECTED, UNASSIGNED)


def mitotic_count(table: pd.DataFrame, *, area_mm2: float, counted: np.ndarray | None = None) -> dict:
    """Mitoses in a region of ``area_mm2``, per 10 HPF and per 2 mm²."""
    n = int((_counted(table) if counted is None else counted).sum()) if len(table) else 0
    return {
        "mitoses": n,
        "area_mm2": round(area_mm2, 4),
        "per_10_hpf": round(n / area_mm2 * 10 * HPF_MM2, 2) if area_mm2 > 0 else None,
        "per_2_mm2": round(n / area_mm2 * 2.0, 2) if area_mm2 > 0 else None,
    }


def hotspot(table: pd.DataFrame, *, mpp: float, area_mm2: float = 10 * HPF_MM2,
            region=None, counted: np.ndarray | None = None) -> dict | None:
    """The square window of ``area_mm2`` holding most mitoses, inside ``region``.

    ``region`` (level-0 box ``(y0, x0, y1, x1)``, the area analysed) bounds the window:
    its side is at most the region's shorter side and it lies wholly inside. Without a
    region, the mitoses' bounding box (grown to the window's side) is the region. The
    window slides in steps of a 64th of its side (24 µm for 10 HPF) and the count is exact
    for the window returned. Returns ``{"y", "x"}`` (level-0 px) of the window centre,
    ``count``, the window side in µm and the ``id`` of the mitosis nearest its centre;
    None when there are no mitoses. ``counted`` (which rows are mitoses) saves recomputing it.

    Examples
    --------
    >>> t = pd.DataFrame({"id": [1, 2], "y": [10.0, 20.0], "x": [10.0, 30.0], "class": ["m", "m"]})
    >>> spot = hotspot(t, mpp=0.25, region=(0, 0, 200, 400))
    >>> spot["side_um"], spot["count"], (spot["y"], spot["x"])
    (50.0, 2, (100.0, 100.0))
    """
    if not len(table):
        return None
    keep = _counted(table) if counted is None else counted
    if not keep.any():
        return None
    y, x = table["y"].to_numpy(float)[keep], table["x"].to_numpy(float)[keep]
    side = np.sqrt(area_mm2) * 1000.0 / mpp  # level-0 px
    if region is None:
        lo, hi = np.array([y.min(), x.min()]), np.array([y.max(), x.max()])
        grow = np.maximum(side - (hi - lo), 0) / 2
        y0, x0, y1, x1 = (*(lo - grow), *(hi + grow))
    else:
        y0, x0, y1, x1 = (float(v) for v in region)
        side = min(side, y1 - y0, x1 - x0)
    window = _densest_window(y - y0, x - x0, (y1 - y0, x1 - x0), side)
    cy, cx = y0 + window.y0 + side / 2, x0 + window.x0 + side / 2
    inside = window.members
    pick = inside if len(inside) else np.arange(len(y))
    nearest = pick[np.argmin(np.maximum(np.abs(y[pick] - cy), np.abs(x[pick] - cx)))]
    return {"y": float(cy), "x": float(cx), "count": window.count,
            "side_um": round(float(side * mpp), 1), "id": int(table["id"].to_numpy()[keep][nearest])}


def _counted(table: pd.DataFrame) -> np.ndarray:
    """Which rows count as mitoses (not rejected, not unassigned)."""
    return ~table["class"].astype(str).isin(EXCLUDED).to_numpy()


#: the hotspot window slides in steps of this fraction of its side
WINDOW_STEPS = 64
#: at most this many steps along the region's longer side (bounds the histogram)
MAX_STEPS = 4096


class _Window(NamedTuple):
    y0: float
    x0: float
    count: int
    members: np.ndarray  # indices of the points in the window


def _densest_window(y: np.ndarray, x: np.ndarray, extent, side: float) -> _Window:
    """The square window of ``side`` inside the box ``[0, extent)`` holding most of the
    points ``(y, x)`` (ties: the first in raster order).

    The box is cut into bins of a ``WINDOW_STEPS``-th of the side (fewer when the box is over
    ``MAX_STEPS`` bins long); a window made of whole bins is counted exactly from the
    histogram's summed-area table, every position at once. A million points take tens of
    milliseconds.

    >>> w = _densest_window(np.array([0.0, 1.0, 50.0]), np.array([0.0, 1.0, 50.0]), (64.0, 64.0), 4.0)
    >>> w.y0, w.x0, w.count, w.members.tolist()
    (0.0, 0.0, 2, [0, 1])
    """
    extent = np.asarray(extent, float)
    m = int(np.clip(np.floor(side * MAX_STEPS / max(float(extent.max()), side)), 1, WINDOW_STEPS))
    step = side / m
    ny, nx = (max(int(v), m) for v in np.ceil(extent / step - 1e-9))
    cy, cx = np.floor(y / step).astype(np.int64), np.floor(x / step).astype(np.int64)
    ok = (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)
    hist = np.bincount(cy[ok] * nx + cx[ok], minlength=ny * nx).reshape(ny, nx)
    sat = np.zeros((ny + 1, nx + 1), np.int64)
    sat[1:, 1:] = hist.cumsum(0).cumsum(1)
    counts = sat[m:, m:] - sat[:-m, m:] - sat[m:, :-m] + sat[:-m, :-m]
    iy, ix = (int(v) for v in np.unravel_index(int(np.argmax(counts)), counts.shape))
    members = np.flatnonzero((cy >= iy) & (cy < iy + m) & (cx >= ix) & (cx < ix + m))
    return _Window(iy * step, ix * step, int(counts[iy, ix]), members)


class MitosisTask(Task):
    name = "mitosis"
    title = "H&E mitotic figure detection (points)"
    tissue_default = "auto"  # sections on glass; the count is per mm² of tissue
    finetune_kind = "mitosis"  # kept, added and rejected figures refit the heatmap's last layer

    def export_corrections(self, annotations, folder, kind=None):
        """``<image>_points.csv`` (the points CSV export) + ``<image>_points.json`` (the image
        path, pixel size and region analysed) in ``folder``: what ``finetune mitosis`` reads.
        Returns the CSV."""
        import json
        from pathlib import Path

        from napari_hemato.core.export import export_points_csv
        from napari_hemato.core.export.formats import safe_name

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = safe_name(Path(annotations.image_path).stem if annotations.image_path else "corrections")
        csv = export_points_csv(annotations, folder / f"{name}_points.csv", overwrite=True)
        region = annotations.region
        head = {"image_path": None if annotations.image_path is None else str(Path(annotations.image_path).resolve()),
                "mpp": annotations.mpp, "region": None if region is None else [int(v) for v in region],
                "class_names": [str(c) for c in annotations.class_names]}
        csv.with_suffix(".json").write_text(json.dumps(head, indent=2) + "\n")
        return csv

    def claims(self, annotations) -> bool:
        return annotations.kind == "points"

    def hierarchy(self, annotations) -> ClassHierarchy:
        """The model's mitosis classes (normal, atypical) and ``rejected`` (a false positive,
        kept as a hard negative): one level, every class on a hotkey."""
        return ClassHierarchy.flat([*annotations.class_names, REJECTED])

    def summary(self, table, *, area_mm2=None, mpp=None, region=None) -> dict:
        """The mitotic count over ``area_mm2`` (the area analysed) and the hotspot inside
        ``region`` (its level-0 box)."""
        if not area_mm2:
            return {}
        counted = _counted(table) if len(table) else None
        out = {"mitotic_count": mitotic_count(table, area_mm2=area_mm2, counted=counted)}
        if mpp:
            out["hotspot"] = hotspot(table, mpp=mpp, region=region, counted=counted)
        return out

    def summary_lines(self, summary: dict) -> list[str]:
        if "mitotic_count" not in summary:
            return []
        c = summary["mitotic_count"]
        lines = [f"{c['mitoses']} mitoses in {c['area_mm2']} mm² analysed: {c['per_10_hpf']} / 10 HPF, "
                 f"{c['per_2_mm2']} / 2 mm²"]
        spot = summary.get("hotspot")
        if spot:
            lines.append(f"hotspot: {spot['count']} in a {spot['side_um']:.0f} µm square")
        return lines


TASK = MitosisTask()
