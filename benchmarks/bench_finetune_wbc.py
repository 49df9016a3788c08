"""Fine-tuning the WBC classifier on another lab's corrected cells: BCCD, coarse labels.

BCCD (another lab, camera and stain than PBC) has white-cell boxes that
``train/bccd_wbc_groups.csv`` gives a coarse group (NEU, EO, LY, MO; developer-assigned,
not expert). Corrections are drawn from BCCD's ``train`` images only (seeded, group-
stratified: 25, 50, 100 cells, each written as the crops export would: a square crop per
cell + ``manifest.csv`` with its diameter); accuracy is measured on every labelled cell of
BCCD's ``val`` images (whole images held out), before and after, through the runtime path
(``classify_in_image`` on the field), and on the PBC reference validation set the model
ships as embeddings. Prints JSON (and writes it with ``--json``).

    python benchmarks/bench_finetune_wbc.py --data ../shared/data [--base MODEL] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _report import emit
from PIL import Image


def bccd_val_accuracy(clf, cells) -> dict:
    """Group accuracy on the held-out BCCD cells (top class's group == the label's)."""
    from napari_hemato.core.classes import WBC_GROUPS

    names = list(clf.spec.class_names)
    member = {c: g for g, ms in WBC_GROUPS.items() for c in ms}
    pred = np.empty(len(cells.table), object)
    for image, rows in cells.table.groupby("image", sort=True):
        idx = rows.index.to_numpy()
        probs, _ = clf.classify_in_image(cells.fields[str(image)], cells.centres[idx], cells.diameters[idx])
        pred[idx] = [member[names[k]] for k in np.asarray(probs).argmax(1)]
    truth = cells.groups
    recalls = {g: float(np.mean(pred[truth == g] == g)) for g in sorted(set(truth))}
    return {"n": int(len(truth)), "accuracy": round(float(np.mean(pred == truth)), 4),
            "balanced_accuracy": round(float(np.mean(list(recalls.values()))), 4),
            "recall": {g: round(r, 3) for g, r in recalls.items()}}


def write_corrections(cells, idx, folder: Path) -> Path:
    """The cells ``idx`` as the Review dock exports them: square crops of
    ``CORRECTION_CONTEXT`` x diameter (red cells around for a red-cell-scale model's
    ruler) + manifest.csv."""
    from napari_hemato.tasks.smear import CORRECTION_CONTEXT

    rows = []
    for i in idx:
        field = cells.fields[str(cells.table["image"].iloc[i])]
        cy, cx = cells.centres[i]
        d = float(cells.diameters[i])
        half = int(round(d * CORRECTION_CONTEXT / 2))
        pad = np.pad(field, ((half, half), (half, half), (0, 0)), mode="constant", constant_values=255)
        y, x = int(round(cy)) + half, int(round(cx)) + half
        crop = pad[y - half : y + half, x - half : x + half]
        name = f"{cells.groups[i]}/cell_{i}.png"
        (folder / cells.groups[i]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(folder / name)
        rows.append({"path": name, "class": cells.groups[i], "diameter_px": d, "reviewed": True,
                     "provenance": "corrected", "slide": str(cells.table["image"].iloc[i])})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def stratified(groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices, each group's share as in ``groups`` (at least one each), seeded."""
    rng = np.random.default_rng(seed)
    picked = []
    for g in sorted(set(groups)):
        idx = rng.permutation(np.flatnonzero(groups == g))
        picked += list(idx[: max(1, int(round(n * len(idx) / len(groups))))])
    return np.array(sorted(picked[:n] if len(picked) > n else picked))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--base", default=None, help="WBC model folder (default: the bundled one)")
    p.add_argument("--sizes", default="25,50,100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from napari_hemato.finetune.wbc import finetune_wbc
    from napari_hemato.models.cell_classifier import CellClassifier
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train.data_coarse import BCCD_GROUPS_CSV, FieldCells

    bccd = Path(args.data) / "bccd" / "JPEGImages"
    pool = FieldCells(BCCD_GROUPS_CSV, bccd, split="train")
    val = FieldCells(BCCD_GROUPS_CSV, bccd, split="val")
    base = resolve_model("wbc", args.base)
    clf = CellClassifier(base, threads=args.threads)
    out = {"base": {"folder": str(base), "name": clf.spec.name, "version": clf.spec.version},
           "bccd_val_before": bccd_val_accuracy(clf, val), "runs": [],
           "pool": {"cells": len(pool), "groups": pd.Series(pool.groups).value_counts().to_dict()},
           "cpu_count": os.cpu_count(), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            idx = stratified(pool.groups, n, args.seed)
            data = write_corrections(pool, idx, Path(tmp) / f"corr{n}")
            t0 = time.perf_counter()
            result = finetune_wbc([data], Path(tmp) / f"model{n}", base=base, threads=args.threads)
            seconds = time.perf_counter() - t0
            tuned = CellClassifier(result.folder, threads=args.threads)
            out["runs"].append({
                "corrections": int(len(idx)), "per_group": result.corrections["per_label"],
                "seconds": round(seconds, 1), "bccd_val_after": bccd_val_accuracy(tuned, val),
                "pbc_reference_before": round(result.metrics["before"]["reference_accuracy"], 4),
                "pbc_reference_after": round(result.metrics["after"]["reference_accuracy"], 4),
                "pbc_reference_balanced_after": round(result.metrics["after"]["reference_balanced_accuracy"], 4),
                "chosen": result.metrics["chosen"]})
    emit(out, args.json, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
