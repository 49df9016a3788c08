"""The summary every task shares, from the object table (never from pixels).

Task-specific summaries live with their task: the WBC differential in
:mod:`napari_hemato.tasks.smear`, the mitotic count and hotspot in
:mod:`napari_hemato.tasks.mitosis`.
"""

from __future__ import annotations

import pandas as pd


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
