"""A small horizontal bar chart of class probabilities (pure Qt, no plotting library)."""

from __future__ import annotations

import math

from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QProgressBar, QWidget

from napari_hemato.core.class_colors import class_color


class ProbabilityBars(QWidget):
    """One labelled bar per class; the chosen class is bold."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setVerticalSpacing(1)
        self._rows: dict[str, tuple[QLabel, QProgressBar]] = {}

    def set_probabilities(self, probs: dict[str, float], chosen: str | None = None) -> None:
        if list(probs) != list(self._rows):
            for label, bar in self._rows.values():
                for w in (label, bar):
                    self._grid.removeWidget(w)
                    w.setParent(None)
                    w.deleteLater()
            self._rows = {}
            for i, name in enumerate(probs):
                label, bar = QLabel(name), QProgressBar()
                bar.setRange(0, 1000)
                bar.setTextVisible(True)
                bar.setMaximumHeight(14)
                r, g, b = class_color(name)
                bar.setStyleSheet(f"QProgressBar::chunk {{ background-color: rgb({r},{g},{b}); }}")
                self._grid.addWidget(label, i, 0)
                self._grid.addWidget(bar, i, 1)
                self._rows[name] = (label, bar)
        for name, (label, bar) in self._rows.items():
            p = probs.get(name, math.nan)
            ok = p == p
            bar.setValue(int(round(1000 * p)) if ok else 0)
            bar.setFormat(f"{100 * p:.1f} %" if ok else "–")
            font = label.font()
            font.setBold(name == chosen)
            label.setFont(font)

    def values(self) -> dict[str, float]:
        """Shown values (0..1), for tests."""
        return {name: bar.value() / 1000 for name, (_, bar) in self._rows.items()}


def heatmap_pixmap(crop, cam, size: int = 160) -> QPixmap:
    """The crop with its class activation map blended in red, as a pixmap."""
    import numpy as np

    crop = np.asarray(crop, np.float32)
    cam = np.clip(np.asarray(cam, np.float32), 0, 1)[..., None]
    red = np.zeros_like(crop)
    red[..., 0] = 255
    blend = np.clip(crop * (1 - 0.5 * cam) + red * 0.5 * cam, 0, 255).astype(np.uint8)
    blend = np.ascontiguousarray(blend)
    h, w = blend.shape[:2]
    image = QImage(blend.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(image).scaled(size, size)
