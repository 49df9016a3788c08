"""A million objects in the review core (no viewer), printed as JSON.

One million nucleus-like rows with the engine's columns (id, y, x, class, confidence, two
class probabilities, provenance, reviewed) in a points :class:`AnnotationSet`; timed:
opening a :class:`~napari_hemato.core.review.ReviewSession`, one class change, its undo,
building the "uncertain" queue, a step of it, and the task's summary. The issue's target for
a class change, the queue's next step and the summaries is < 100 ms each. The viewer side
(opening 1M points in napari, panning) is not measured here.

Usage:  python benchmarks/bench_million.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def _smear_summary(rng, n):
    """The WBC differential of a million-cell smear table (1 % white cells, 5 % platelets)."""
    from napari_hemato.models.cell_classifier import CLASS_NAMES
    from napari_hemato.tasks import get_task

    if not hasattr(_smear_summary, "table"):
        kind = rng.choice(["RBC", "WBC", "Platelets"], n, p=[0.94, 0.01, 0.05])
        sub = rng.choice(list(CLASS_NAMES), n)
        _smear_summary.table = pd.DataFrame({"cell_type": kind,
                                             "class": np.where(kind == "WBC", sub, kind)})
    return get_task("smear").summary(_smear_summary.table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    args = p.parse_args()
    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.review import ReviewSession
    from napari_hemato.tasks import get_task

    rng = np.random.default_rng(0)
    n = args.n
    p_a = rng.uniform(0, 1, n)
    table = pd.DataFrame({
        "id": np.arange(1, n + 1), "y": rng.uniform(0, 1e5, n), "x": rng.uniform(0, 1e5, n),
        "class": np.where(p_a >= 0.5, "normal", "atypical"), "confidence": np.maximum(p_a, 1 - p_a),
        "score": rng.uniform(0.6, 1, n), "prob_normal": p_a, "prob_atypical": 1 - p_a,
        "provenance": "auto", "reviewed": False})
    ann = AnnotationSet("points", table, ["normal", "atypical"], mpp=0.25)
    task = get_task("mitosis")
    out = {"objects": n}
    t0 = time.perf_counter()
    session = ReviewSession(ann, hierarchy=task.hierarchy(ann))
    out["open_session_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    ids = iter(range(1, n + 1, 7))

    def change_and_undo():
        session.set_class([next(ids)], "atypical")
        session.undo()

    out["class_change_and_undo_ms"] = _timed(change_and_undo)
    out["class_change_ms"] = _timed(lambda: session.set_class([next(ids)], "atypical"))
    out["undo_ms"] = _timed(session.undo)
    out["build_queue_ms"] = _timed(lambda: session.build_queue(mode="uncertain"), repeat=1)
    out["queue_next_ms"] = _timed(session.next)
    out["summary_ms"] = _timed(lambda: task.summary(session.table, area_mm2=625.0, mpp=0.25))
    out["smear_differential_ms"] = _timed(lambda: _smear_summary(rng, n))
    out["target_ms"] = 100
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
