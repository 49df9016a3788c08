"""Review dock widget: inspect, correct and confirm every object; live summaries.

Click an object (or walk the queue with Alt-N / Alt-P) to see its class, the
probability of every class and, for white cells, where the classifier looked.
Alt-1 … Alt-9, Alt-0, Alt-Minus set the 1st … 11th class; Alt-R marks reviewed;
Alt-Z undoes the last class change. Painting, erasing or filling with napari's
tools keeps the table in step; merge, split and delete act on the selection.
Every change is autosaved next to the image within a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from napari_hemato._widgets.review_layout import build_panel
from napari_hemato.core.review import ReviewSession
from napari_hemato.core.sidecar import autosave
from napari_hemato.io.layers import KEY, annotations_from_layer, features_of, labels_colormap
from napari_hemato.tasks import task_for

log = logging.getLogger(__name__)
CLASS_KEYS = [f"Alt-{k}" for k in "1234567890"] + ["Alt-Minus"]


def _is_ours(layer) -> bool:
    meta = layer.metadata.get(KEY, {})
    return meta.get("role") in ("instances", "points")


class ReviewWidget(QWidget):
    """Per-object review of a napari-hemato Labels or Points layer."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.sessions: dict[int, ReviewSession] = {}
        self.layer = None
        self.selected: int | None = None
        self._saved_revision: dict[int, int] = {}
        self._summary: dict = {}
        self._build()
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(800)
        self._autosave_timer.timeout.connect(self.autosave)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)
        viewer.layers.selection.events.active.connect(self._on_active)
        self._bind_keys()
        self._refresh_layers()

    def _build(self) -> None:
        build_panel(self)

    def _bind_keys(self) -> None:
        for k, key in enumerate(CLASS_KEYS):
            self.viewer.bind_key(key, self._class_key(k), overwrite=True)
        for key, fn in (("Alt-N", self.next), ("Alt-P", self.previous),
                        ("Alt-R", self.mark_reviewed), ("Alt-Z", self.undo)):
            self.viewer.bind_key(key, lambda _v, fn=fn: fn(), overwrite=True)

    def _class_key(self, k: int):
        def handler(_viewer):
            if self.session is not None and k < len(self.session.class_names):
                self.set_class(self.session.class_names[k])
        return handler

    # -- layers and sessions ----------------------------------------------------
    def _refresh_layers(self, event=None) -> None:
        ours = [layer for layer in self.viewer.layers if _is_ours(layer)]
        current = self.layer
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        for layer in ours:
            self.layer_box.addItem(layer.name)
        self.layer_box.blockSignals(False)
        if current in ours:
            self.layer_box.setCurrentIndex(ours.index(current))
        elif ours:
            self.bind_layer(ours[-1])
        else:
            self.layer = None

    def _on_active(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and _is_ours(layer) and layer is not self.layer:
            self.bind_layer(layer)

    def _on_layer_choice(self, index: int) -> None:
        ours = [layer for layer in self.viewer.layers if _is_ours(layer)]
        if 0 <= index < len(ours):
            self.bind_layer(ours[index])

    @property
    def session(self) -> ReviewSession | None:
        return self.sessions.get(id(self.layer)) if self.layer is not None else None

    def bind_layer(self, layer) -> ReviewSession:
        """Review ``layer`` (a layer made by napari-hemato)."""
        self.layer = layer
        if id(layer) not in self.sessions:
            ann = annotations_from_layer(layer)
            if ann.metadata.get("lazy"):
                ann.labels = None  # whole-slide labels stay read-only; classes are editable
            session = ReviewSession(ann)
            self.sessions[id(layer)] = session
            self._saved_revision[id(layer)] = 0
            layer.mouse_drag_callbacks.append(self._on_click)
            if ann.kind == "instances" and ann.labels is not None:
                layer.events.paint.connect(lambda e, layer=layer: self._on_paint(layer))
            if ann.kind == "points":
                layer.feature_defaults = {**{c: v for c, v in layer.feature_defaults.items()},
                                          "id": -1, "index": -1, "class": "unassigned",
                                          "provenance": "manual", "reviewed": False}
                layer.events.data.connect(lambda e, layer=layer: self._on_points_data(layer))
        session = self.sessions[id(layer)]
        ours = [lyr for lyr in self.viewer.layers if _is_ours(lyr)]
        if layer in ours and self.layer_box.currentIndex() != ours.index(layer):
            self.layer_box.blockSignals(True)
            self.layer_box.setCurrentIndex(ours.index(layer))
            self.layer_box.blockSignals(False)
        self.selected = None
        self.info.setText("click an object, or Next (Alt-N) to walk the queue")
        self.class_box.clear()
        self.class_box.addItems(session.class_names)
        self.queue_mode.blockSignals(True)
        self.queue_mode.clear()
        self.queue_mode.addItems(["uncertain", "confidence"] + [f"class:{c}" for c in session.class_names])
        self.queue_mode.blockSignals(False)
        is_points = session.annotations.kind == "points"
        for w in (self.merge_button, self.merge_with, self.split_button):
            w.setEnabled(not is_points and session.labels is not None)
        self.accept_button.setEnabled(is_points)
        self.reject_button.setEnabled(is_points)
        self.hotspot_button.setVisible(is_points)
        self.build_queue()
        self._update_summary()
        return session

    # -- selection --------------------------------------------------------------
    def _on_click(self, layer, event):
        if event.type != "mouse_press":
            return
        value = layer.get_value(event.position, world=True)
        if layer is not self.layer:
            self.bind_layer(layer)
        if self.session.annotations.kind == "points":
            if value is None:
                return
            obj_id = int(layer.features["id"].iloc[int(value)])
        else:
            obj_id = int(value[0] if isinstance(value, tuple) else value or 0)
        if obj_id > 0 and obj_id in self.session.table.index:
            self.select(obj_id, center=False)

    def select(self, obj_id: int, *, center: bool = True) -> None:
        """Show object ``obj_id`` (and centre the view on it)."""
        session = self.session
        self.selected = int(obj_id)
        row = session.row(obj_id)
        mark = "✓ reviewed" if row["reviewed"] else "not reviewed"
        self.info.setText(f"id {obj_id}: <b>{row['class']}</b> ({row['provenance']}, {mark})<br>"
                          f"model said {row.get('class_auto', row['class'])} with "
                          f"{float(row['confidence']):.2f}")
        self.bars.set_probabilities(session.probabilities(obj_id), chosen=row["class"])
        if row["class"] in session.class_names:
            self.class_box.setCurrentText(str(row["class"]))
        self.merge_with.setValue(0)
        self._show_cam(row)
        if center:
            from napari_hemato.io.viewer import level0_to_world

            camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
            camera.center = level0_to_world(self.layer, float(row["y"]), float(row["x"]))
        if session.annotations.kind == "instances" and session.labels is not None:
            self.layer.selected_label = int(obj_id)

    def _show_cam(self, row) -> None:
        self.cam.clear()
        task = task_for(self.session.annotations)
        if not task.has_cam(row):
            return
        try:
            crop, cam = task.cam(self.session.annotations, row)
        except Exception as err:  # noqa: BLE001 - the CAM is an aid; never break review
            log.info("no CAM for object %s: %s", row["id"], err)
            return
        from napari_hemato._widgets.prob_bars import heatmap_pixmap

        self.cam.setPixmap(heatmap_pixmap(crop, cam))

    # -- actions ----------------------------------------------------------------
    def _after_change(self) -> None:
        session, layer = self.session, self.layer
        layer.features = features_of(session.table.reset_index(drop=True))
        if session.annotations.kind == "instances":
            colormap = labels_colormap(session.table, session.class_names)
            if colormap is not None:
                layer.colormap = colormap
        else:
            from napari_hemato.core.class_colors import class_color_float

            colors = [class_color_float(c) for c in session.table["class"].astype(str)]
            if colors:
                layer.face_color = colors
                layer.border_color = colors
        if self.selected is not None and self.selected in session.table.index:
            self.select(self.selected, center=False)
        self._update_summary()
        self._autosave_timer.start()

    def set_class(self, name: str) -> None:
        if self.session is None or self.selected is None:
            return
        self.session.set_class([self.selected], name)
        self._after_change()

    def mark_reviewed(self) -> None:
        if self.session is not None and self.selected is not None:
            self.session.mark_reviewed([self.selected])
            self._after_change()

    def undo(self) -> None:
        if self.session is not None and self.session.undo():
            self._after_change()

    def merge(self) -> None:
        other = self.merge_with.value()
        if self.selected is None or other not in self.session.table.index or other == self.selected:
            self.info.setText("select an object, enter the id to merge into it, then Merge")
            return
        self.session.merge(self.selected, other)
        self.layer.refresh()
        self._after_change()

    def split(self) -> None:
        if self.selected is not None:
            self.session.split(self.selected)
            self.layer.refresh()
            self._after_change()

    def delete(self) -> None:
        if self.selected is None:
            return
        session = self.session
        if session.annotations.kind == "points":
            index = int(np.flatnonzero(self.layer.features["id"].to_numpy() == self.selected)[0])
            self.layer.selected_data = {index}
            self.layer.remove_selected()  # the data event syncs the table
        else:
            session.delete([self.selected])
            self.layer.refresh()
            self._after_change()
        self.selected = None

    def accept(self) -> None:
        if self.selected is not None:
            self.session.accept([self.selected])
            self._after_change()

    def reject(self) -> None:
        if self.selected is not None:
            self.session.reject([self.selected])
            self._after_change()

    def _on_paint(self, layer) -> None:
        if layer is not self.layer:
            self.bind_layer(layer)
        added, removed = self.session.sync_with_labels()
        self._after_change()

    def _on_points_data(self, layer) -> None:
        if layer is not self.layer:
            self.bind_layer(layer)
        session = self.session
        ids = layer.features["id"].to_numpy(np.int64).copy() if len(layer.features) else np.zeros(0, np.int64)
        yx = np.asarray(layer.data, float).reshape(-1, 2) + np.asarray(session.annotations.origin, float)
        session.sync_points(yx, ids)
        self._after_change()

    # -- queue ------------------------------------------------------------------
    def build_queue(self) -> None:
        if self.session is not None and self.queue_mode.currentText():
            self.session.build_queue(mode=self.queue_mode.currentText())
            self._update_progress()

    def next(self) -> None:
        if self.session is not None and (obj_id := self.session.next()) is not None:
            self.select(obj_id)

    def previous(self) -> None:
        if self.session is not None and (obj_id := self.session.previous()) is not None:
            self.select(obj_id)

    def _update_progress(self) -> None:
        done, total = self.session.progress
        self.progress_label.setText(f"reviewed {done} / {total}")

    # -- summaries --------------------------------------------------------------
    def _update_summary(self, extra: dict | None = None) -> None:
        session = self.session
        if session is None:
            return
        self._update_progress()
        ann = session.annotations
        task = task_for(ann)
        summary = task.summary(session.table, area_mm2=ann.region_mm2, mpp=ann.mpp, region=ann.region)
        lines = task.summary_lines({**summary, **(extra or {})})
        if not lines:
            counts = session.table["class"].value_counts()
            lines = [", ".join(f"{k}: {v}" for k, v in counts.items())]
        self.summary.setText("<br>".join(lines))
        self._summary = summary

    def jump_to_hotspot(self) -> None:
        session = self.session
        if session is None:
            return
        self._update_summary()
        spot = self._summary.get("hotspot")
        if spot is not None:
            self.select(spot["id"])

    # -- autosave ---------------------------------------------------------------
    def autosave(self) -> Path | None:
        """Save every changed session next to its image."""
        saved = None
        for layer in list(self.viewer.layers):
            session = self.sessions.get(id(layer))
            if session is None or session.revision == self._saved_revision.get(id(layer)):
                continue
            name = layer.metadata.get(KEY, {}).get("sidecar_name", layer.name)
            path = autosave(session.to_annotations(), name)
            if path is not None:
                saved = path
                self._saved_revision[id(layer)] = session.revision
        return saved

