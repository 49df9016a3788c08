"""A gigapixel slide end to end (issue 12 item 6), printed as JSON.

Builds a 31623² px (1.0 GP) pyramidal OME-TIFF mosaicked from the real CMU H&E region
(``bench_engine.build_slide``), then:

1. the CLI, ``napari-hemato analyze SLIDE --task nuclei --model M --tissue none --out S``,
   on the 100 MP mosaic and on the 1 GP one, each in its own process: wall time, MP/s and
   the process's peak RSS (its ``VmHWM``);
2. the same 1 GP run on a dask.distributed ``LocalCluster`` of 2 worker processes (one
   thread each), through ``api.analyze(..., scheduler=client)``;
3. the two 1 GP results compared: labels chunk by chunk, and the tables.

``M`` defaults to the fixed benchmark model (``benchmarks/fixed_model.py``): this measures
the engine, not a network. The widget path (the Analyse dock, progress in the activity
dock) runs the same engine and is not timed here.

Usage:  python benchmarks/bench_gigapixel.py [--model DIR] [--size 31623] [--no-cluster]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _report import emit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cli_run(slide: Path, model: Path, out: Path) -> dict:
    """One CLI run in a child process (the benchmark's only child at that moment)."""
    shutil.rmtree(out, ignore_errors=True)
    # the child's own high-water mark (VmHWM, kB): getrusage's maxrss survives exec on Linux
    # and would report the parent's peak (building the mosaic) instead
    code = ("import re, sys; from napari_hemato.cli import main; "
            "rc = main(sys.argv[1:]); "
            "print('RSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
            "sys.exit(rc or 0)")
    cmd = [sys.executable, "-c", code, "analyze", str(slide), "--task", "nuclei",
           "--model", str(model), "--tissue", "none", "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"CLI failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = [line for line in done.stdout.splitlines() if line.startswith("RSS ")]
    from napari_hemato.core.engine import open_result

    result = open_result(out)
    mp = result.grid.roi[2] * result.grid.roi[3] / 1e6
    return {"slide_mp": round(mp, 1), "seconds": round(dt, 1), "mp_per_s": round(mp / dt, 3),
            "tiles": len(result.plan), "objects": result.n_objects,
            "peak_rss_mb": round(int(rss[-1].split()[1]) / 1024) if rss else None}


def cluster_run(slide: Path, model: Path, out: Path) -> dict:
    import distributed

    from napari_hemato import api

    shutil.rmtree(out, ignore_errors=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        t0 = time.perf_counter()
        result = api.analyze(str(slide), task="nuclei", model=str(model), tissue="none",
                             out=out, scheduler=client)
        dt = time.perf_counter() - t0
    mp = result.grid.roi[2] * result.grid.roi[3] / 1e6
    return {"seconds": round(dt, 1), "mp_per_s": round(mp / dt, 3), "objects": result.n_objects}


def same_results(a: Path, b: Path) -> dict:
    """Labels compared chunk by chunk (never the whole array in memory), and the tables."""
    from napari_hemato.core.engine import open_result

    ra, rb = open_result(a), open_result(b)
    la, lb = ra.labels(), rb.labels()
    step = la.chunks[0] * 4
    differ = 0
    for y in range(0, la.shape[0], step):
        differ += int((np.asarray(la[y:y + step]) != np.asarray(lb[y:y + step])).sum())
    return {"label_pixels_differing": differ, "tables_equal": bool(ra.table().equals(rb.table()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=HERE / "_data" / "fixed_model")
    p.add_argument("--size", type=int, default=31623)
    p.add_argument("--small", type=int, default=10000)
    p.add_argument("--no-cluster", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from bench_engine import build_slide

    if not (args.model / "model.onnx").exists():
        sys.exit(f"{args.model}: no model; run python benchmarks/fixed_model.py first")
    t0 = time.perf_counter()
    big = build_slide(args.size)
    out = {"build_s": round(time.perf_counter() - t0, 1), "model": args.model.name}
    work = HERE / "_data" / "gigapixel"
    work.mkdir(exist_ok=True)
    out["cli_small"] = cli_run(build_slide(args.small), args.model, work / "small.zarr")
    out["cli_big"] = cli_run(big, args.model, work / "big_cli.zarr")
    out["rss_growth"] = round(out["cli_big"]["peak_rss_mb"] / out["cli_small"]["peak_rss_mb"] - 1, 3)
    if not args.no_cluster:
        out["cluster_big"] = cluster_run(big, args.model, work / "big_cluster.zarr")
        out["cluster_vs_cli"] = same_results(work / "big_cli.zarr", work / "big_cluster.zarr")
    out["benchmark_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    emit(out, args.out)


if __name__ == "__main__":
    main()
