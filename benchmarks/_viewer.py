"""The viewer benchmarks' shown napari viewer and their one way to time a redraw."""

from __future__ import annotations

import time


def shown_viewer():
    """``(viewer, draw)``: a shown napari viewer (needs a display: ``xvfb-run -a``) and a
    function that repaints its canvas, processes the events and returns the seconds taken."""
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()

    def draw() -> float:
        t = time.perf_counter()
        viewer.window._qt_viewer.canvas.native.repaint()
        app.processEvents()
        return time.perf_counter() - t

    draw()
    return viewer, draw
