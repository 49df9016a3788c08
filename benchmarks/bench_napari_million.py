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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--out")
    args = p.parse_args()
    import napari
    from napari.layers import Layer
    from qtpy.QtWidgets import QApplication

    from napari_hemato.core.annotations import AnnotationSet
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
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()

    def draw() -> float:
        t = time.perf_counter()
        viewer.window._qt_viewer.canvas.native.repaint()
        app.processEvents()
        return time.perf_counter() - t

    draw()
    out = {"points": n}
    t0 = time.perf_counter()
    data, kwargs, kind = annotation_layer_data(ann, name="mitoses")
    out["layer_data_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    layer = Layer.create(data, kwargs, kind)
    viewer.add_layer(layer)
    out["add_layer_s"] = round(time.perf_counter() - t0, 2)
    out["first_draw_s"] = round(draw(), 2)
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
    viewer.close()
    emit(out, args.out)


if __name__ == "__main__":
    main()
