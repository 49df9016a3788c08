"""Engine benchmark on large pyramidal OME-TIFFs tiled from a real H&E slide.

Prints one JSON object. Measures, with a fixed ONNX model (the bundled nuclei
model, or ``--model DIR``):

- end-to-end throughput (megapixels of slide per second) through the engine;
- engine overhead: engine tiles/s over bare ``predictor.predict`` tiles/s on the
  same tiles held in memory (no reading, post-processing, stitching or
  writing), and over predict + post-processing;
- peak RSS of a whole run at two slide sizes (each in a fresh process);
- resume after cancelling at 50 %: how many finished tiles were redone.

Usage::

    python benchmarks/bench_engine.py                 # 100 MP and 400 MP slides
    python benchmarks/bench_engine.py --sizes 4000 8000 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
SOURCE = HERE.parent.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"


def build_slide(size: int, mpp: float = 0.5) -> Path:
    """A size×size pyramidal OME-TIFF (JPEG tiles) mosaicked from real H&E."""
    import tifffile

    from napari_hemato.core.slide import open_slide

    path = DATA / f"he_mosaic_{size}.ome.tif"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    src = open_slide(SOURCE)
    base = np.asarray(src.levels[0][:, :, :3])
    h, w = base.shape[:2]
    variants = [base, base[::-1], base[:, ::-1], base[::-1, ::-1]]
    rows = []
    for r in range(-(-size // h)):
        row = np.concatenate([variants[(r + c) % 4] for c in range(-(-size // w))], axis=1)
        rows.append(row[:, :size])
    mosaic = np.concatenate(rows, axis=0)[:size]
    del rows
    levels = [mosaic]
    while min(levels[-1].shape[:2]) > 2048:
        prev = levels[-1]
        hh, ww = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(prev[:hh, :ww].reshape(hh // 2, 2, ww // 2, 2, 3).mean((1, 3)).astype(np.uint8))
    opts = dict(tile=(512, 512), photometric="rgb", compression="jpeg", compressionargs={"level": 90})
    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER",
                  metadata={"PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}, **opts)
        for i, level in enumerate(levels[1:], 1):
            tif.write(level, subfiletype=1, resolution=(1e4 / (mpp * 2**i),) * 2,
                      resolutionunit="CENTIMETER", **opts)
    os.replace(tmp, path)
    return path


def default_model() -> Path:
    from napari_hemato.models.registry import bundled_models

    models = bundled_models()
    if "nuclei" not in models:
        sys.exit("no bundled nuclei model; pass --model DIR")
    return models["nuclei"]


def run_once(slide_path: Path, model: Path, out: Path, tile: int | None) -> dict:
    """One full engine run (called in a fresh process for a clean RSS)."""
    from napari_hemato.core.engine import run
    from napari_hemato.core.slide import open_slide
    from napari_hemato.models.onnx_backend import OnnxPredictor

    slide = open_slide(slide_path)
    predictor = OnnxPredictor(model)
    t0 = time.perf_counter()
    result = run(slide, predictor, out=out, tile=tile, overwrite=True)
    dt = time.perf_counter() - t0
    mp = slide.shape[0] * slide.shape[1] / 1e6
    return {
        "slide_mp": round(mp, 1),
        "tiles": len(result.plan),
        "seconds": round(dt, 2),
        "mp_per_s": round(mp / dt, 3),
        "tiles_per_s": round(len(result.plan) / dt, 3),
        "objects": result.n_objects,
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def in_subprocess(slide_path: Path, model: Path, out: Path, tile: int | None) -> dict:
    cmd = [sys.executable, __file__, "--_run-once", str(slide_path), str(model), str(out),
           str(tile or 0)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead(slide_path: Path, model: Path, out: Path, tile: int | None, n_tiles: int) -> dict:
    """Engine vs bare model on the same tiles: about ``n_tiles`` of the engine's own
    (auto-sized) tiles from the slide's corner, or of ``tile``."""
    from napari_hemato.core.engine import run
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.objects import id_stride, tile_objects
    from napari_hemato.core.slide import open_slide
    from napari_hemato.core.tiling import auto_tile, plan_tiles
    from napari_hemato.models.onnx_backend import OnnxPredictor

    slide = open_slide(slide_path)
    predictor = OnnxPredictor(model)
    spec = predictor.spec
    # the core the engine itself picks for the whole slide, so the ratio is the run's
    tile = tile or auto_tile(WorkGrid.for_model(slide, spec.mpp).shape, tile=spec.tile,
                             halo=spec.halo, size_divisor=spec.size_divisor)
    side = int(np.ceil(np.sqrt(n_tiles)))
    roi = (0, 0, min(side * tile, slide.shape[0]), min(side * tile, slide.shape[1]))
    grid = WorkGrid.for_model(slide, spec.mpp, roi=roi)
    plan = plan_tiles(grid.shape, tile=tile, halo=spec.halo, size_divisor=spec.size_divisor)
    images = [grid.read(slide, t.outer, fill=spec.pad_value) for t in plan]
    from napari_hemato.core.engine import AUTO_BATCH_PIXELS

    batch = min(8, max(1, int(AUTO_BATCH_PIXELS // plan.input_size**2)))  # what the engine uses
    predictor.predict(np.stack(images[:batch]))  # warm-up
    t0 = time.perf_counter()
    outputs = []
    for k in range(0, len(images), batch):
        outputs.append(predictor.predict(np.stack(images[k : k + batch])))
    bare = time.perf_counter() - t0
    t1 = time.perf_counter()
    stride = id_stride(len(plan))
    for k, out_batch in enumerate(outputs):
        for j, t in enumerate(list(plan)[k * batch : (k + 1) * batch]):
            tile_objects({r: o[j] for r, o in out_batch.items()}, t, plan, spec, grid.mpp, stride=stride)
    post = time.perf_counter() - t1
    del images, outputs
    t2 = time.perf_counter()
    run(slide, predictor, out=out, roi=roi, tile=tile, batch_size=batch, overwrite=True)
    engine = time.perf_counter() - t2
    return {
        "tiles": len(plan),
        "input_px": plan.input_size,
        "bare_model_tiles_per_s": round(len(plan) / bare, 3),
        "model_plus_postprocess_tiles_per_s": round(len(plan) / (bare + post), 3),
        "engine_tiles_per_s": round(len(plan) / engine, 3),
        "engine_over_bare_model": round(bare / engine, 3),
        "engine_over_model_plus_postprocess": round((bare + post) / engine, 3),
    }


def resume_check(slide_path: Path, model: Path, out: Path, tile: int | None, n_tiles: int) -> dict:
    """Cancel at 50 %, resume, count tiles predicted twice."""
    from napari_hemato.core.engine import iter_run, run
    from napari_hemato.core.slide import open_slide
    from napari_hemato.models.onnx_backend import OnnxPredictor

    class Counting(OnnxPredictor):
        tiles_seen = 0

        def predict(self, batch, **kw):
            Counting.tiles_seen += len(batch)
            return super().predict(batch, **kw)

    slide = open_slide(slide_path)
    predictor = Counting(model)
    tile = tile or predictor.spec.tile
    side = int(np.ceil(np.sqrt(n_tiles)))
    roi = (0, 0, min(side * tile, slide.shape[0]), min(side * tile, slide.shape[1]))
    gen = iter_run(slide, predictor, out=out, roi=roi, tile=tile, batch_size=2, overwrite=True)
    event = next(gen)
    while event.fraction < 0.5:
        event = next(gen)
    gen.close()  # tiles in flight are finished and kept, so count what is on disk
    done_at_cancel, total = len(list((out / "tiles").glob("*.npz"))), event.total
    first = Counting.tiles_seen
    result = run(slide, predictor, out=out, roi=roi, tile=tile, batch_size=2, resume=True)
    second = Counting.tiles_seen - first
    return {
        "tiles": total,
        "done_at_cancel": done_at_cancel,
        "predicted_after_resume": second,
        "finished_tiles_redone": second - (total - done_at_cancel),
        "status": result.status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10000, 20000],
                        help="two slide sides in px (default 10000 20000 = 100 and 400 MP)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tile", type=int, help="tile core size (default: the model's)")
    parser.add_argument("--quick", action="store_true", help="fewer tiles for overhead/resume")
    parser.add_argument("--_run-once", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run_once:
        s, m, o, t = args._run_once
        print(json.dumps(run_once(Path(s), Path(m), Path(o), int(t) or None)))
        return
    model = args.model or default_model()
    slides = [build_slide(s) for s in args.sizes]
    out = DATA / "bench_result.zarr"
    n = 8 if args.quick else 24
    report = {
        "model": str(model),
        "cpu_count": os.cpu_count(),
        "overhead": overhead(slides[0], model, out, args.tile, n),
        "resume_after_cancel_at_50pct": resume_check(slides[0], model, out, args.tile, n),
        "runs": [in_subprocess(s, model, out, args.tile) for s in slides],
    }
    a, b = report["runs"]
    report["rss_growth"] = round(b["peak_rss_mb"] / a["peak_rss_mb"] - 1, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
