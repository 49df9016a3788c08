"""Edit here / Save into slide on a whole-slide result (issue 12 item 4), printed as JSON.

Takes the 400 MP result ``bench_engine.py`` leaves (``_data/bench_result.zarr``: 20000² px,
~250k objects; run ``python benchmarks/bench_engine.py`` first), copies it, and for a few
views the size of a full-HD screen at 1:1 (1080 x 1920 px) times: opening the window
(:func:`~napari_hemato.core.region_edit.open_window`), a delete, a merge and a painted
object in its review session (the paint's table sync timed), and the save (:func:`~napari_hemato.core.region_edit.
commit_window`, journal and table merge included). After the saves it checks that every id
in the stored labels of the edited boxes has one row whose area is its pixel count.

Usage:  python benchmarks/bench_region_edit.py [--views 5] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import emit

DATA = Path(__file__).parent / "_data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=5)
    p.add_argument("--store", type=Path, default=DATA / "bench_result.zarr")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.engine import open_result
    from napari_hemato.core.region_edit import commit_window, open_window
    from napari_hemato.core.review import ReviewSession

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "r.zarr"
        shutil.copytree(args.store, store)
        result = open_result(store)
        table = result.table()
        h, w = result.grid.shape
        rng = np.random.default_rng(0)
        runs, boxes = [], []
        for _ in range(args.views):
            y, x = int(rng.integers(0, h - 1080)), int(rng.integers(0, w - 1920))
            t0 = time.perf_counter()
            ann = open_window(result, table, (y, x, y + 1080, x + 1920))
            t_open = time.perf_counter() - t0
            session = ReviewSession(ann)
            free = [int(i) for i in ann.table["id"] if i not in ann.metadata["edit"]["locked"]]
            session.delete([free[0]])
            session.merge(free[1], free[2])
            labels = session.labels
            yy, xx = np.argwhere(labels == 0)[labels.size // 7 % max((labels == 0).sum(), 1)]
            labels[max(yy - 4, 0):yy + 4, max(xx - 4, 0):xx + 4] = session._next_id()
            t0 = time.perf_counter()
            session.sync_with_labels()
            t_paint = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = commit_window(result, session.to_annotations(), table)
            t_save = time.perf_counter() - t0
            table = done.table
            box = ann.metadata["edit"]["box"]
            boxes.append(box)
            runs.append({"box_mp": round((box[2] - box[0]) * (box[3] - box[1]) / 1e6, 2),
                         "objects": len(ann.table), "cut_by_edge": len(ann.metadata["edit"]["locked"]),
                         "open_s": round(t_open, 3), "paint_sync_s": round(t_paint, 3),
                         "save_s": round(t_save, 3),
                         "changed": len(done.changed)})
        # consistency of the edited boxes: every stored id there has its row and its area
        rows = table.set_index("id")
        bad = 0
        for box in boxes:
            stored = from_result(result, roi=tuple(box)).labels
            ids, counts = np.unique(stored[stored > 0], return_counts=True)
            inside = rows.loc[ids]
            whole = ((inside.bbox_y0 >= box[0]) & (inside.bbox_x0 >= box[1])
                     & (inside.bbox_y1 <= box[2]) & (inside.bbox_x1 <= box[3])).to_numpy()
            bad += int((inside["area_px"].to_numpy()[whole] != counts[whole]).sum())
        out = {"slide_px": [h, w], "table_rows": len(table), "views": runs,
               "open_s_max": max(r["open_s"] for r in runs),
               "paint_sync_s_max": max(r["paint_sync_s"] for r in runs),
               "save_s_max": max(r["save_s"] for r in runs),
               "rows_not_matching_labels": bad,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
