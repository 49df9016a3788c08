"""Many small images end to end on 2 CPU cores, printed as JSON (issue: "many small images
as fast as one large one").

- ``analyze_folder``: ``napari-hemato analyze FOLDER --task smear --out-dir OUT`` on BCCD
  held-out fields (640×480 JPEGs), one process, timed from the command's start to its end
  (so Python start-up and model loading count), with ``--mpp 0.08`` and without (the pixel
  size then measured on each field's red cells);
- ``per_field``: the same fields through :func:`napari_hemato.api.analyze` in one process,
  split into the engine's own timings (read, predict, post-process, ...) and the rest (the
  per-image overhead: opening, the store, the WBC stage, the table);
- ``classify_cells``: ``napari-hemato classify-cells`` on PBC single-cell JPEGs, one process.

Usage:  python benchmarks/bench_many_images.py [--fields 72] [--cells 1100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CLI = [str(Path(sys.executable).with_name("napari-hemato"))]  # the installed command


def _fields(n: int, folder: Path) -> list[Path]:
    from napari_hemato.train.data_smear import read_split

    bccd = DATA / "bccd"
    stems = read_split(bccd, "val")[:n]
    folder.mkdir(parents=True, exist_ok=True)
    for s in stems:
        shutil.copyfile(bccd / "JPEGImages" / f"{s}.jpg", folder / f"{s}.jpg")
    return sorted(folder.iterdir())


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def analyze_folder(n: int, tmp: Path) -> dict:
    fields = _fields(n, tmp / "fields")
    out = {}
    for name, extra in (("mpp_given", ["--mpp", "0.08"]), ("mpp_measured", []),
                        ("mpp_measured_per_image", ["--ruler", "per-image"])):
        dt = _timed([*CLI, "analyze", str(tmp / "fields"), "--task", "smear", "--out-dir",
                     str(tmp / f"out_{name}"), "--overwrite", *extra])
        out[name] = {"fields": len(fields), "seconds": round(dt, 2),
                     "fields_per_s": round(len(fields) / dt, 3),
                     "seconds_per_field": round(dt / len(fields), 3)}
    return out


def per_field(n: int, tmp: Path) -> dict:
    from napari_hemato.api import analyze

    fields = _fields(n, tmp / "fields")
    analyze(fields[0], task="smear", mpp=0.08, out=tmp / "warm.zarr", overwrite=True)
    engine, total = {}, 0.0
    for f in fields:
        t0 = time.perf_counter()
        r = analyze(f, task="smear", mpp=0.08, out=tmp / "one.zarr", overwrite=True)
        r.table()
        total += time.perf_counter() - t0
        for k, v in r.timings.items():
            engine[k] = engine.get(k, 0.0) + v
    inside = sum(v for k, v in engine.items() if k in ("read", "predict", "postprocess", "write",
                                                         "stitch", "table"))
    return {"fields": len(fields), "seconds_per_field": round(total / len(fields), 3),
            "engine_s_per_field": {k: round(v / len(fields), 3) for k, v in engine.items()},
            "rest_s_per_field": round((total - inside) / len(fields), 3),
            "note": "rest = opening, the run store, the WBC subtype stage, the table: per-image "
                    "overhead beyond the detector's engine steps (read/predict/postprocess overlap "
                    "in threads, so the engine steps can sum to more than their wall time)"}


def classify_cells(n: int, tmp: Path) -> dict:
    files = sorted((DATA / "pbc").rglob("*.jpg"))
    files = files[:: max(1, len(files) // n)][:n]
    folder = tmp / "cells"
    folder.mkdir(parents=True)
    for k, f in enumerate(files):
        shutil.copyfile(f, folder / f"{k:05d}_{f.name}")
    dt = _timed([*CLI, "classify-cells", str(folder), "--out", str(tmp / "cells.csv")])
    each = _timed([*CLI, "classify-cells", str(folder), "--ruler", "per-cell", "--out", str(tmp / "each.csv")])
    return {"cells": len(files), "seconds": round(dt, 2), "cells_per_s": round(len(files) / dt, 1),
            "ruler": "pooled (default: one reading per image size)",
            "per_cell_ruler": {"seconds": round(each, 2), "cells_per_s": round(len(files) / each, 1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=72)
    p.add_argument("--cells", type=int, default=1100)
    p.add_argument("--only", default="analyze_folder,per_field,classify_cells")
    args = p.parse_args()
    wanted = args.only.split(",")
    report = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "analyze_folder" in wanted:
            report["analyze_folder"] = analyze_folder(args.fields, tmp / "a")
        if "per_field" in wanted:
            report["per_field"] = per_field(min(args.fields, 20), tmp / "p")
        if "classify_cells" in wanted:
            report["classify_cells"] = classify_cells(args.cells, tmp / "c")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
