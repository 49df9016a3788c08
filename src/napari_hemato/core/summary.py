"""Live summaries from the object table (never from pixels).

- Counts and percent per class, mean confidence (every task).
- WBC differential: counts and percent per white-cell class, against the
  100- or 200-cell target of a manual differential; RBC and platelet counts.
- Mitotic count per 10 high-power fields (HPF) and per 2 mm², and the densest
  hotspot. One HPF is taken as 0.237 mm² (10 HPF = 2.37 mm², the area used by
  the MIDOG challenge); the area is that of the analysed region.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

WBC_CLASSES = ("SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT")
HPF_MM2 = 0.237
EXCLUDED = ("rejected", "unassigned")


def class_summary(table: pd.DataFrame) -> dict:
    """Counts per class (and percent) and the mean confidence, for every task's summary.

    Examples
    --------
    >>> class_summary(pd.DataFrame({"class": ["a", "b", "a"], "confidence": [0.5, 1.0, 0.9]}))
    {'n_objects': 3, 'counts': {'a': 2, 'b': 1}, 'percent': {'a': 66.7, 'b': 33.3}, 'mean_confidence': 0.8}
    """
    counts = table["class"].value_counts().sort_index() if len(table) else pd.Series(dtype=int)
    total = int(counts.sum())
    return {
        "n_objects": total,
        "counts": {str(k): int(v) for k, v in counts.items()},
        "percent": {str(k): round(100.0 * v / total, 1) for k, v in counts.items()} if total else {},
        "mean_confidence": round(float(table["confidence"].mean()), 6) if total else None,
    }


def differential(table: pd.DataFrame, *, target: int = 100) -> dict:
    """WBC differential from a smear table (``class`` holds the WBC subtype).

    Examples
    --------
    >>> t = pd.DataFrame({"class": ["SNE", "SNE", "LY", "RBC"], "cell_type": ["WBC", "WBC", "WBC", "RBC"]})
    >>> differential(t)["percent"]["SNE"]
    66.7
    """
    classes = table["class"].astype(str)
    wbc = classes[classes.isin(WBC_CLASSES)]
    if "cell_type" in table:  # a platelet seen by the detector is not a WBC-classifier PLT
        wbc = wbc[table.loc[wbc.index, "cell_type"].astype(str) == "WBC"]
    counts = {c: int((wbc == c).sum()) for c in WBC_CLASSES}
    total = int(sum(counts.values()))
    cell_type = table["cell_type"].astype(str) if "cell_type" in table else classes
    return {
        "wbc_total": total,
        "target": target,
        "target_reached": total >= target,
        "counts": counts,
        "percent": {c: round(100.0 * n / total, 1) if total else 0.0 for c, n in counts.items()},
        "rbc": int((cell_type == "RBC").sum()),
        "platelets": int((cell_type == "Platelets").sum()),
    }


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
