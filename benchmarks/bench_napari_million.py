"""A million points with their features opened in a real napari viewer, printed as JSON.

Issue 12 item 5's viewer side: one million mitosis-like points (the engine's columns) made
into a layer by :func:`napari_hemato.io.layers.annotation_layer_data` and added to a shown
viewer; timed: building the layer data, ``viewer.add_layer`` and the first draw of the
canvas (``QApplication.processEvents`` after ``canvas.native.repaint``), then a pan of the
camera and its redraw. Needs a display (run under ``xvfb-run`` on a headless machine).

Usage:  xvfb-run -a python benchmarks/bench_napari_million.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _report import emit
from _viewer import shown_viewer


def _all_in_view_drawn(layer, viewer) -> bool:
    """Whether every point inside the camera's view is drawn (the level of detail's promise
    once zoomed in)."""
    from napari_hemato.io.viewer import camera_world_box

    box = np.sort(np.array([layer.world_to_data(p)[-2:] for p in camera_world_box(viewer)]), axis=0)
    yx = np.asarray(layer.data)
    inside = np.all((yx >= box[0]) & (yx <= box[1]), axis=1)
    return bool(inside.any() and layer.shown[inside].all())


def _review_steps(viewer, layer, draw) -> dict:
    """A reviewer's steps in the Review dock on the million-point layer: bind, a class
    change (the layer's features and colours follow), the queue's next step."""
    from napari_hemato._widgets.review import ReviewWidget

    out = {}
    t0 = time.perf_counter()
    review = ReviewWidget(viewer)
    viewer.layers.selection.active = layer
    review.bind_layer(layer)
    out["review_bind_s"] = round(time.perf_counter() - t0, 2)
    review.select(int(layer.features["id"].iloc[12345]), center=False)
    changes = []
    for name in ("atypical", "normal", "atypical", "normal"):
        t0 = time.perf_counter()
        review.set_class(name)
        changes.append(time.perf_counter() - t0)
    out["review_first_class_change_s"] = round(changes[0], 3)  # adds the class_auto column once
    out["review_class_change_s_max"] = round(max(changes[1:]), 3)
    out["review_class_change_redraw_s"] = round(draw(), 3)
    steps = []
    for _ in range(4):
        t0 = time.perf_counter()
        review.next()
        steps.append(time.perf_counter() - t0)
    out["review_first_next_s"] = round(steps[0], 3)  # napari's first Shapes layer (numba compiles)
    out["review_next_s_max"] = round(max(steps[1:]), 3)
    out["review_next_redraw_s"] = round(draw(), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--no-lod", action="store_true", help="draw every point (the baseline)")
    p.add_argument("--out")
    args = p.parse_args()
    from napari.layers import Layer

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.io import point_lod
    from napari_hemato.io.layers import annotation_layer_data

    rng = np.random.default_rng(0)
    n = args.n
    p_a = rng.uniform(0, 1, n)
    side = 100_000  # 25 mm at 0.25 µm/px
    table = pd.DataFrame({
        "id": np.arange(1, n + 1), "y": rng.uniform(0, side, n), "x": rng.uniform(0, side, n),
        "class": np.where(p_a >= 0.5, "normal", "atypical"), "confidence": np.maximum(p_a, 1 - p_a),
        "score": rng.uniform(0.6, 1, n), "prob_normal": p_a, "prob_atypical": 1 - p_a,
        "provenance": "auto", "reviewed": False})
    ann = AnnotationSet("points", table, ["normal", "atypical"], mpp=0.25)
    viewer, draw = shown_viewer()
    out = {"points": n, "level_of_detail": not args.no_lod}
    t0 = time.perf_counter()
    data, kwargs, kind = annotation_layer_data(ann, name="mitoses")
    out["layer_data_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    layer = Layer.create(data, kwargs, kind)
    if not args.no_lod:
        point_lod.install(viewer)
        point_lod.prepare(viewer, layer)
    viewer.add_layer(layer)
    out["add_layer_s"] = round(time.perf_counter() - t0, 2)
    out["first_draw_s"] = round(draw(), 2)
    out["points_drawn"] = int(layer.shown.sum())
    out["open_total_s"] = round(out["layer_data_s"] + out["add_layer_s"] + out["first_draw_s"], 2)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    pans = []
    for k in range(5):
        camera.center = (side * 0.25 * (0.2 + 0.15 * k), side * 0.25 * 0.5)
        pans.append(draw())
    out["pan_redraw_s_max"] = round(max(pans), 3)
    camera.zoom = camera.zoom * 50  # a reviewer's zoom: a few hundred µm
    zoomed = []
    for k in range(5):
        camera.center = (side * 0.25 * (0.2 + 0.15 * k), side * 0.25 * 0.5)
        zoomed.append(draw())
    out["zoomed_pan_redraw_s_max"] = round(max(zoomed), 3)
    out["zoomed_points_drawn"] = int(layer.shown.sum())
    out["zoomed_all_in_view_drawn"] = _all_in_view_drawn(layer, viewer)
    lod = point_lod.lod_of(layer)  # None when every point fits the draw budget
    out["plans_made"] = lod.n_plans if lod is not None else 0
    out.update(_review_steps(viewer, layer, draw))
    viewer.close()
    emit(out, args.out)


if __name__ == "__main__":
    main()
