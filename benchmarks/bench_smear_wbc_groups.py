"""The smear pipeline's white-cell calls on held-out BCCD fields, against coarse labels.

``analyze --task smear`` (detector + the bundled WBC classifier, pixel size read from the red
cells as a user without ``--mpp`` gets it) on BCCD's held-out (``val``) fields; each labelled
white cell of ``train/bccd_wbc_groups.csv`` (developer-assigned NEU / EO / LY / MO) is matched to
the detected white cell whose centre lies in its box, and its 11-class call is scored by group.
``evaluate wbc`` scores the classifier alone on the same boxes; this scores what a user gets.
Prints JSON.

    python benchmarks/bench_smear_wbc_groups.py --data ../shared/data [--fields 87] [--json OUT]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _report import emit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--fields", type=int, default=None, help="default: every held-out field")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    bccd = args.data / "bccd"
    if not bccd.is_dir():
        print(f"{args.data}: no bccd/ (needs ../shared/data)")
        return 2
    import pandas as pd

    from napari_hemato.api import analyze
    from napari_hemato.core.classes import WBC_GROUPS
    from napari_hemato.train.data_coarse import BCCD_GROUPS_CSV, read_coarse_table
    from napari_hemato.train.data_smear import read_split

    labels = read_coarse_table(BCCD_GROUPS_CSV, split="val")
    stems = read_split(bccd, "val")[: args.fields]
    rows, seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="bench-smear-wbc-") as tmp:
        for k, stem in enumerate(stems):
            t0 = time.perf_counter()
            table = analyze(bccd / "JPEGImages" / f"{stem}.jpg", task="smear", out=Path(tmp) / f"{k}.zarr").table()
            seconds += time.perf_counter() - t0
            wbc = table[table["cell_type"] == "WBC"]
            for _, box in labels[labels["image"] == stem].iterrows():
                inside = wbc[(wbc.y >= box.bbox_y0) & (wbc.y < box.bbox_y1)
                             & (wbc.x >= box.bbox_x0) & (wbc.x < box.bbox_x1)]
                call = None if inside.empty else str(inside.iloc[0]["class"])
                rows.append({"image": stem, "group": box.group, "call": call,
                             "right": call is not None and call in WBC_GROUPS[box.group]})
    frame = pd.DataFrame(rows)
    found = frame[frame["call"].notna()]
    by_group = {g: {"cells": int(len(v)), "accuracy": round(float(v["right"].mean()), 3)}
                for g, v in found.groupby("group")}
    out = {"fields": len(stems), "labelled_white_cells": int(len(frame)), "detected": int(len(found)),
           "accuracy_of_detected": round(float(found["right"].mean()), 3) if len(found) else None,
           "by_group": by_group, "seconds_per_field": round(seconds / max(len(stems), 1), 3),
           "wrong": found[~found["right"]][["image", "group", "call"]].to_dict("records")}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
