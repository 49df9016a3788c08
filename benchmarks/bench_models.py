"""Speed of the bundled models on 2 CPU cores, printed as JSON.

- nuclei: megapixels of slide per second end to end through the engine, on a
  real-H&E mosaic (built by ``bench_engine.py``) at 0.5 µm/px;
- wbc: cells per second through ``CellClassifier.classify_crops`` (crop, size
  normalisation, colour standardisation, resize, inference) on real PBC
  images, batch 64;
- smear: BCCD fields (640×480) per second through ``api.analyze`` (detector +
  WBC subtype stage), and cells per second;
- mitosis: megapixels of slide per second end to end on a piece of the same
  mosaic (0.5 µm/px slide, resampled by the engine to the model's 0.25 µm/px:
  4 work-grid pixels per slide pixel).

Usage:  python benchmarks/bench_models.py [--size 6000] [--only nuclei,wbc,smear,mitosis]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
PBC = DATA / "pbc"


def bench_slide(task: str, size: int) -> dict:
    """End-to-end megapixels of slide per second for ``task`` on a ``size``² mosaic (0.5 µm/px)."""
    from bench_engine import build_slide

    from napari_hemato.api import analyze

    slide = build_slide(size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = analyze(slide, task=task, out=Path(tmp) / "r.zarr")
        dt = time.perf_counter() - t0
    mp = size * size / 1e6
    return {"slide_mp": mp, "slide_mpp": 0.5, "seconds": round(dt, 2), "mp_per_s": round(mp / dt, 3),
            "work_grid_mp_per_s": round(float(np.prod(result.grid.shape)) / 1e6 / dt, 3),
            "tiles": len(result.plan), "input_px": result.plan.input_size,
            "objects": result.n_objects,
            "timings_s": {k: round(v, 2) for k, v in result.timings.items()}}


def bench_wbc(n: int = 512) -> dict:
    from skimage.io import imread

    from napari_hemato.models.cell_classifier import CellClassifier

    files = sorted(PBC.rglob("*.jpg"))[:: max(1, len(sorted(PBC.rglob("*.jpg"))) // n)][:n]
    crops = [imread(f)[..., :3] for f in files]
    from napari_hemato.models.cell_classifier import estimate_cell_diameter

    classifier = CellClassifier()
    classifier.classify_crops(crops[:64])  # warm-up
    t0 = time.perf_counter()
    classifier.classify_crops(crops, batch_size=64)
    with_estimate = time.perf_counter() - t0
    diameters = [estimate_cell_diameter(c) for c in crops]
    t0 = time.perf_counter()
    classifier.classify_crops(crops, diameters, batch_size=64)
    given = time.perf_counter() - t0
    return {"cells": len(crops),
            "cells_per_s_diameter_given": round(len(crops) / given, 1),
            "cells_per_s_diameter_estimated": round(len(crops) / with_estimate, 1),
            "note": "given = the smear pipeline (the detector's mask gives the size); "
                    "estimated = classify-cells on single-cell images"}


def bench_smear(n: int = 20) -> dict:
    from napari_hemato.api import analyze
    from napari_hemato.train.data_smear import BCCD_MPP, read_split

    bccd = DATA / "bccd"
    stems = read_split(bccd, "val")[:n]
    cells = 0
    with tempfile.TemporaryDirectory() as tmp:
        analyze(bccd / "JPEGImages" / f"{stems[0]}.jpg", task="smear", mpp=BCCD_MPP,
                out=Path(tmp) / "warm.zarr")
        t0 = time.perf_counter()
        for s in stems:
            r = analyze(bccd / "JPEGImages" / f"{s}.jpg", task="smear", mpp=BCCD_MPP,
                        out=Path(tmp) / f"{s}.zarr")
            cells += r.n_objects
        dt = time.perf_counter() - t0
    return {"fields": len(stems), "seconds": round(dt, 2), "fields_per_s": round(len(stems) / dt, 3),
            "cells": cells, "cells_per_s": round(cells / dt, 1),
            "note": "640x480 BCCD fields at 0.08 um/px, detector + WBC subtype stage, one call each"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000, help="mosaic side in px (default 6000 = 36 MP)")
    parser.add_argument("--only", default="nuclei,wbc,smear,mitosis",
                        help="comma-separated models to time (default all bundled)")
    args = parser.parse_args()
    from napari_hemato.models.registry import bundled_models

    wanted = set(args.only.split(","))
    have = bundled_models()
    report = {"cpu_count": os.cpu_count(), "bundled": sorted(have)}
    runs = {"nuclei": lambda: bench_slide("nuclei", args.size), "wbc": bench_wbc,
            "smear": bench_smear, "mitosis": lambda: bench_slide("mitosis", min(args.size, 3000))}
    for name, run in runs.items():
        if name in wanted and name in have:
            report[name] = run()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
