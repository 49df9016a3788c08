"""A whole-slide Labels result opened in a real napari viewer, printed as JSON.

Issue 12 item 5's Labels side: a finished instance run (by default the 1 GP run of
``bench_gigapixel.py``, made here when it is missing) opened the way the reader and the
Analyse dock open it (:func:`napari_hemato.io.viewer.result_layer_data`) into a shown viewer.
Timed: reopening the store, building the layer data (the table and its colours), creating
the Labels layer, ``viewer.add_layer`` and the first draw; then pans of the whole slide and
of a reviewer's zoom. ``--level0-only`` opens level 0 alone (what napari-hemato did before
``core.label_pyramid``): the baseline. Needs a display (``xvfb-run -a`` on a headless machine).

Usage:  xvfb-run -a python benchmarks/bench_napari_labels.py [--result S.zarr] [--level0-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _report import emit
from _viewer import shown_viewer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _result(path: Path | None, size: int) -> Path:
    """The result to open: ``path``, else the gigapixel benchmark's, made when missing."""
    if path is not None:
        return path
    from bench_engine import build_slide
    from bench_gigapixel import cli_run

    out = HERE / "_data" / "gigapixel" / f"labels_{size}.zarr"
    if not (out / "zarr.json").exists():
        model = HERE / "_data" / "fixed_model"
        if not (model / "model.onnx").exists():
            sys.exit(f"{model}: no model; run python benchmarks/fixed_model.py first")
        out.parent.mkdir(parents=True, exist_ok=True)
        print("running", cli_run(build_slide(size), model, out), file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result", type=Path, help="a finished instance run (default: 1 GP, made)")
    p.add_argument("--size", type=int, default=31623, help="side of the slide made by default")
    p.add_argument("--level0-only", action="store_true", help="no pyramid (the baseline)")
    p.add_argument("--out")
    args = p.parse_args()
    path = _result(args.result, args.size)

    from napari.layers import Layer

    from napari_hemato.core import label_pyramid
    from napari_hemato.core.engine import open_result
    from napari_hemato.io import viewer as glue

    t0 = time.perf_counter()
    result = open_result(path)
    out = {"result": path.name, "open_result_s": round(time.perf_counter() - t0, 2),
           "pixels_mp": round(result.labels().size / 1e6, 1), "objects": int(result.n_objects)}
    t0 = time.perf_counter()
    built = label_pyramid.ensure(result.store.group)  # timed apart: a run made before levels
    out["pyramid_built_now_s"] = round(time.perf_counter() - t0, 1) if built else None
    if args.level0_only:
        result.label_levels = lambda: [result.labels()]
    viewer, draw = shown_viewer()
    t0 = time.perf_counter()
    [(data, kwargs, kind)] = glue.result_layer_data(result, name="nuclei")
    out["layer_data_s"] = round(time.perf_counter() - t0, 2)
    out["levels"] = len(data) if isinstance(data, list) else 1
    t0 = time.perf_counter()
    layer = Layer.create(data, kwargs, kind)
    out["create_layer_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    viewer.add_layer(layer)
    out["add_layer_s"] = round(time.perf_counter() - t0, 2)
    out["first_draw_s"] = round(draw(), 2)
    out["open_total_s"] = round(sum(out[k] for k in ("open_result_s", "layer_data_s",
                                                     "create_layer_s", "add_layer_s",
                                                     "first_draw_s")), 2)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    h, w = (s * f for s, f in zip(result.labels().shape, layer.scale[-2:], strict=True))
    pans = []
    for k in range(4):
        camera.center = (h * (0.2 + 0.2 * k), w * 0.5)
        pans.append(draw())
    out["pan_redraw_s_max"] = round(max(pans), 2)
    camera.zoom = camera.zoom * 40  # a reviewer's view: about a 40th of the slide's side
    zoomed = []
    for k in range(4):
        camera.center = (h * (0.2 + 0.2 * k), w * 0.3)
        zoomed.append(draw())
    out["zoomed_pan_redraw_s_max"] = round(max(zoomed), 2)
    out["level_drawn_zoomed"] = int(layer.data_level) if layer.multiscale else 0
    viewer.close()
    emit(out, args.out)


if __name__ == "__main__":
    main()
