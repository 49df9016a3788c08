"""Mitosis detection on H&E: points, the mitotic count per 10 HPF and per 2 mm², hotspot.

The count is over the area analysed; the hotspot is the square window of 10 HPF
holding most mitoses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from napari_hemato.tasks.base import Task

#: one high-power field; 10 HPF = 2.37 mm², the area used by the MIDOG challenge
HPF_MM2 = 0.237
EXCLUDED = ("rejected", "unassigned")


def mitotic_count(table: pd.DataFrame, *, area_mm2: float) -> dict:
    """Mitoses in a region of ``area_mm2``, per 10 HPF and per 2 mm²."""
    n = int((~table["class"].astype(str).isin(EXCLUDED)).sum()) if len(table) else 0
    return {
        "mitoses": n,
        "area_mm2": round(area_mm2, 4),
        "per_10_hpf": round(n / area_mm2 * 10 * HPF_MM2, 2) if area_mm2 > 0 else None,
        "per_2_mm2": round(n / area_mm2 * 2.0, 2) if area_mm2 > 0 else None,
    }


def hotspot(table: pd.DataFrame, *, mpp: float, area_mm2: float = 10 * HPF_MM2) -> dict | None:
    """The square window of ``area_mm2`` holding most mitoses (centred on a mitosis).

    Returns ``{"y", "x"}`` (level-0 px) of the window centre, ``count`` and the
    window side in µm; None when there are no mitoses.
    """
    t = table[~table["class"].astype(str).isin(EXCLUDED)] if len(table) else table
    if not len(t):
        return None
    side_um = np.sqrt(area_mm2) * 1000.0
    yx = t[["y", "x"]].to_numpy(float) * mpp
    tree = cKDTree(yx)
    counts = np.array([len(tree.query_ball_point(p, side_um / 2, p=np.inf)) for p in yx])
    best = int(np.argmax(counts))
    return {"y": float(t["y"].iloc[best]), "x": float(t["x"].iloc[best]),
            "count": int(counts[best]), "side_um": round(side_um, 1), "id": int(t["id"].iloc[best])}


class MitosisTask(Task):
    name = "mitosis"
    title = "H&E mitotic figure detection (points)"

    def claims(self, annotations) -> bool:
        return annotations.kind == "points"

    def summary(self, table, *, area_mm2=None, mpp=None) -> dict:
        if not area_mm2:
            return {}
        out = {"mitotic_count": mitotic_count(table, area_mm2=area_mm2)}
        if mpp:
            out["hotspot"] = hotspot(table, mpp=mpp)
        return out

    def summary_lines(self, summary: dict) -> list[str]:
        if "mitotic_count" not in summary:
            return []
        c = summary["mitotic_count"]
        lines = [f"{c['mitoses']} mitoses in {c['area_mm2']} mm²: {c['per_10_hpf']} / 10 HPF, "
                 f"{c['per_2_mm2']} / 2 mm²"]
        spot = summary.get("hotspot")
        if spot:
            lines.append(f"hotspot: {spot['count']} in a {spot['side_um']:.0f} µm square")
        return lines


TASK = MitosisTask()
