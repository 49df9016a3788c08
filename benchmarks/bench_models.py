"""Speed of the bundled models on 2 CPU cores, printed as JSON.

- nuclei: megapixels of slide per second end to end through the engine, on a
  real-H&E mosaic (built by ``bench_engine.py``) at 0.5 µm/px;
- wbc: cells per second through ``CellClassifier.classify_crops`` (crop, size
  normalisation, resize, inference) on real PBC images, batch 64.

Usage:  python benchmarks/bench_models.py [--size 6000]
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
PBC = HERE.parent.parent / "shared" / "data" / "pbc"


def bench_nuclei(size: int) -> dict:
    from bench_engine import build_slide

    from napari_hemato.api import analyze

    slide = build_slide(size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = analyze(slide, task="nuclei", out=Path(tmp) / "r.zarr")
        dt = time.perf_counter() - t0
    mp = size * size / 1e6
    return {"slide_mp": mp, "seconds": round(dt, 2), "mp_per_s": round(mp / dt, 3),
            "tiles": len(result.plan), "input_px": result.plan.input_size,
            "objects": result.n_objects, "timings_s": {k: round(v, 2) for k, v in result.timings.items()}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000, help="mosaic side in px (default 6000 = 36 MP)")
    parser.add_argument("--skip-wbc", action="store_true")
    args = parser.parse_args()
    from napari_hemato.models.registry import bundled_models

    report = {"cpu_count": os.cpu_count(), "bundled": sorted(bundled_models())}
    if "nuclei" in bundled_models():
        report["nuclei"] = bench_nuclei(args.size)
    if "wbc" in bundled_models() and not args.skip_wbc:
        report["wbc"] = bench_wbc()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
