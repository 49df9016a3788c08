"""Review dock widget: inspect, correct and confirm every object; live summaries.

Click an object (or walk the queue with Alt-N / Alt-P, which zoom to it and frame
it) to see its class, the probability of every class and, for white cells, where
the classifier looked. The task's class hierarchy puts every class on a hotkey:
Alt-1 … Alt-0, Alt-Minus the first bank (a smear's 11 white-cell subtypes), Control-Alt-1 …
the second (its cell types). Alt-R marks reviewed; Alt-Z undoes and Alt-Y (or
Shift-Alt-Z) redoes any review action, per layer. Painting, erasing or filling with
napari's tools keeps the table in step; merge, split and delete act on the selection.
On a whole-slide layer (masks too large to hold), Edit here makes the view an
editable window and Save into slide writes it back. Review sessions are keyed on the layer's ``unique_id`` (napari hands plugin widgets
proxies, never the same object twice), so undo and the queue position survive
switching layers. Every change is autosaved next to the image within a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from napari_hemato._widgets.review_frame import frame_object, layer_uid, show_cam
from napari_hemato._widgets.review_layout import build_panel
from napari_hemato.core.classes import BANK_KEYS, BANK_MODIFIERS
from napari_hemato.core.review import ReviewSession
from napari_hemato.io import point_lod
from napari_hemato.io.layers import (
    KEY,
    annotations_from_layer,
    class_colors,
    features_of,
    labels_colormap,
)
from napari_hemato.tasks import task_for

log = logging.getLogger(__name__)
CLASS_KEYS = [f"{m}-{k}" for m in BANK_MODIFIERS for k in BANK_KEYS]


def _is_ours(layer) -> bool:
    meta = layer.metadata.get(KEY, {})
    return meta.get("role") in ("instances", "points")


class ReviewWidget(QWidget):
    """Per-object review of a napari-hemato Labels or Points layer."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        point_lod.install(viewer)  # big Points layers drawn with a level of detail
        self.sessions: dict = {}  # unique_id of a layer -> its session
        self.layer = None
        self.selected: int | None = None
        self._saved_revision: dict = {}
        self._highlight = None
        self._names: dict = {}  # unique_id -> sidecar name, so a removed layer still saves
        self._summary: dict = {}
        self._synced: dict = {}  # unique_id of a layer -> the session revision its layer shows
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
        for key in CLASS_KEYS:
            self.viewer.bind_key(key, self._class_key(key), overwrite=True)
        for key, fn in (("Alt-N", self.next), ("Alt-P", self.previous),
                        ("Alt-R", self.mark_reviewed), ("Alt-Z", self.undo),
                        ("Alt-Y", self.redo), ("Shift-Alt-Z", self.redo)):
            self.viewer.bind_key(key, lambda _v, fn=fn: fn(), overwrite=True)

    @property
    def hotkeys(self) -> dict[str, str]:
        """``{key: class}`` of the layer under review (every class of its task's hierarchy)."""
        return self.session.hierarchy.hotkeys() if self.session is not None else {}

    def _class_key(self, key: str):
        def handler(_viewer):
            if (name := self.hotkeys.get(key)) is not None:
                self.set_class(name)
        return handler

    # -- layers and sessions ----------------------------------------------------
    def _refresh_layers(self, event=None) -> None:
        ours = [layer for layer in self.viewer.layers if _is_ours(layer)]
        uids = [layer_uid(layer) for layer in ours]
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        for layer in ours:
            self.layer_box.addItem(layer.name)
        self.layer_box.blockSignals(False)
        if set(self.sessions) - set(uids):  # a removed layer: save its last corrections
            self.autosave()
            for gone in set(self.sessions) - set(uids):
                self.sessions.pop(gone, None)
        if layer_uid(self.layer) in uids:
            self.layer_box.setCurrentIndex(uids.index(layer_uid(self.layer)))
        elif ours:
            self.bind_layer(ours[-1])
        else:
            self.layer = None

    def _on_active(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and _is_ours(layer) and layer_uid(layer) != layer_uid(self.layer):
            self.bind_layer(layer)

    def _on_layer_choice(self, index: int) -> None:
        ours = [layer for layer in self.viewer.layers if _is_ours(layer)]
        if 0 <= index < len(ours):
            self.bind_layer(ours[index])

    @property
    def session(self) -> ReviewSession | None:
        return self.sessions.get(layer_uid(self.layer)) if self.layer is not None else None

    def bind_layer(self, layer) -> ReviewSession:
        """Review ``layer`` (a layer made by napari-hemato); its session (undo history,
        queue and position) is kept while the layer exists."""
        self.layer = layer
        uid = layer_uid(layer)
        new = uid not in self.sessions
        if new:
            ann = annotations_from_layer(layer)
            if ann.metadata.get("lazy"):
                ann.labels = None  # whole-slide labels stay read-only; classes are editable
            session = ReviewSession(ann, hierarchy=task_for(ann).hierarchy(ann))
            self.sessions[uid] = session
            self._saved_revision[uid] = 0
            self._synced[uid] = session.revision  # the layer's rows are the session's
            self._names[uid] = layer.metadata.get(KEY, {}).get("sidecar_name", layer.name)
            layer.mouse_drag_callbacks.append(self._on_click)
            if ann.kind == "instances" and ann.labels is not None:
                layer.events.paint.connect(lambda e, layer=layer: self._on_paint(layer))
            if ann.kind == "points":
                layer.feature_defaults = {**{c: v for c, v in layer.feature_defaults.items()},
                                          "id": -1, "index": -1, "class": "unassigned",
                                          "provenance": "manual", "reviewed": False}
                layer.events.data.connect(lambda e, layer=layer: self._on_points_data(layer))
        session = self.sessions[uid]
        uids = [layer_uid(lyr) for lyr in self.viewer.layers if _is_ours(lyr)]
        if uid in uids and self.layer_box.currentIndex() != uids.index(uid):
            self.layer_box.blockSignals(True)
            self.layer_box.setCurrentIndex(uids.index(uid))
            self.layer_box.blockSignals(False)
        self.selected = None
        self.info.setText("click an object, or Next (Alt-N) to walk the queue")
        self.class_box.clear()
        for name in session.classes:
            self.class_box.addItem(session.hierarchy.label(name), name)
        self.queue_mode.blockSignals(True)
        self.queue_mode.clear()
        self.queue_mode.addItems(["uncertain", "confidence"] + [f"class:{c}" for c in session.classes])
        self.queue_mode.setCurrentText(session.queue_mode)
        self.queue_mode.blockSignals(False)
        is_points = session.annotations.kind == "points"
        for w in (self.merge_button, self.merge_with, self.split_button):
            w.setEnabled(not is_points and session.labels is not None)
        lazy = bool(session.annotations.metadata.get("lazy"))
        self.edit_here_button.setEnabled(lazy and not is_points)
        self.finetune.set_task(task_for(session.annotations))
        self.save_window_button.setEnabled("edit" in session.annotations.metadata)
        self.accept_button.setEnabled(is_points)
        self.reject_button.setEnabled(is_points)
        self.hotspot_button.setVisible(is_points)
        if new:
            self.build_queue()  # a known layer keeps its queue and position
        self._update_summary()
        return session

    # -- selection --------------------------------------------------------------
    def _on_click(self, layer, event):
        if event.type != "mouse_press":
            return
        value = layer.get_value(event.position, world=True)
        if layer_uid(layer) != layer_uid(self.layer):
            self.bind_layer(layer)
        if self.session.annotations.kind == "points":
            if value is None:
                return
            obj_id = int(layer.features["id"].iloc[int(value)])
        else:
            obj_id = int(value[0] if isinstance(value, tuple) else value or 0)
        if obj_id > 0 and obj_id in self.session.table.index:
            self.select(obj_id, center=False)

    def select(self, obj_id: int, *, center: bool = True, zoom: bool = False) -> None:
        """Show object ``obj_id``: centre the view on it and, with ``zoom``, frame it at a
        review scale and draw a box around it."""
        session = self.session
        self.selected = int(obj_id)
        row = session.row(obj_id)
        mark = "✓ reviewed" if row["reviewed"] else "not reviewed"
        conf = pd.to_numeric(pd.Series([row.get("confidence")]), errors="coerce").iloc[0]
        said = (f"model said {row.get('class_auto', row['class'])} with {conf:.2f}"
                if np.isfinite(conf) else "added by hand")
        self.info.setText(f"id {obj_id}: <b>{session.hierarchy.label(str(row['class']))}</b> "
                          f"({row['provenance']}, {mark})<br>{said}")
        self.bars.set_probabilities(session.probabilities(obj_id), chosen=row["class"])
        if (k := self.class_box.findData(str(row["class"]))) >= 0:
            self.class_box.setCurrentIndex(k)
        self.merge_with.setValue(0)
        show_cam(self, row)
        if center or zoom:
            self._highlight = frame_object(self.viewer, self.layer, row, mpp=self.session.annotations.mpp,
                                           zoom=zoom, highlight=self._highlight)
        if session.annotations.kind == "instances" and session.labels is not None:
            self.layer.selected_label = int(obj_id)

    # -- actions ----------------------------------------------------------------
    def _after_change(self) -> None:
        session, layer = self.session, self.layer
        if not self._rows_in_place():
            self._whole_layer()
        self._synced[layer_uid(layer)] = session.revision
        if self.selected is not None and self.selected in session.table.index:
            self.select(self.selected, center=False)
        self._update_summary()
        self._autosave_timer.start()

    def _rows_in_place(self) -> bool:
        """Write only the rows the last revision changed into a Points layer's features and
        colours (a class change on a million points); False when the whole layer must follow."""
        session, layer = self.session, self.layer
        ids = session.last_changed
        if (ids is None or session.annotations.kind != "points"
                or self._synced.get(layer_uid(layer)) != session.revision - 1):
            return False
        features = layer.features
        rows = session.table.loc[ids]
        if len(features) != len(session.table):
            return False
        pos = session.table.index.get_indexer(ids)
        if (pos < 0).any() or not np.array_equal(features["id"].to_numpy()[pos], ids):
            return False
        for column in rows.columns.difference(features.columns):  # e.g. class_auto, once
            features[column] = session.table[column].to_numpy()
        for column in rows.columns:  # only the columns that changed (a column write costs ms)
            values = rows[column].to_numpy()
            if not pd.Series(values).equals(pd.Series(features[column].to_numpy()[pos])):
                features.iloc[pos, features.columns.get_loc(column)] = values
        colors = class_colors(rows["class"])
        layer._face.colors[pos] = colors  # napari keeps one RGBA row per point
        layer._border.colors[pos] = colors
        layer.refresh(extent=False, highlight=False, thumbnail=False)
        return True

    def _whole_layer(self) -> None:
        session, layer = self.session, self.layer
        layer.features = features_of(session.table.reset_index(drop=True))
        if session.annotations.kind == "instances":
            colormap = labels_colormap(session.table, session.class_names)
            if colormap is not None:
                layer.colormap = colormap
        else:
            colors = class_colors(session.table["class"])
            if len(colors):
                layer.face_color = colors
                layer.border_color = colors

    def set_class(self, name: str) -> None:
        if self.session is None or self.selected is None:
            return
        self.session.set_class([self.selected], name)
        self._after_change()

    def mark_reviewed(self) -> None:
        if self.session is not None and self.selected is not None:
            self.session.mark_reviewed([self.selected])
            self._after_change()

    def undo(self) -> str | None:
        """Take back the last review action on this layer (Alt-Z); its name."""
        return self._history(self.session.undo) if self.session is not None else None

    def redo(self) -> str | None:
        """Replay the last undone action on this layer (Alt-Y, Shift-Alt-Z); its name."""
        return self._history(self.session.redo) if self.session is not None else None

    def _history(self, step) -> str | None:
        action = step()
        if action is None:
            return None
        if self.session.annotations.kind == "points":
            self._points_from_table()
        else:
            self.layer.refresh()
        if self.selected is not None and self.selected not in self.session.table.index:
            self.selected = None
        self._after_change()
        self.info.setText(f"{'undid' if step == self.session.undo else 'redid'} {action}. "
                          + self.info.text())
        return action

    def _points_from_table(self) -> None:
        """Put the points back where the (restored) table says, without a sync."""
        session, layer = self.session, self.layer
        yx = session.table[["y", "x"]].to_numpy(float) - np.asarray(session.annotations.origin, float)
        with layer.events.data.blocker():
            layer.data = yx.reshape(-1, 2)

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

    def edit_here(self):
        """A whole-slide layer's view as an editable window layer (:mod:`.region_edit`)."""
        from napari_hemato._widgets.region_edit import edit_here

        return edit_here(self)

    def save_window(self) -> dict | None:
        """Write the edit window under review back into its slide (:mod:`.region_edit`)."""
        from napari_hemato._widgets.region_edit import save_window

        return save_window(self)

    def accept(self) -> None:
        if self.selected is not None:
            self.session.accept([self.selected])
            self._after_change()

    def reject(self) -> None:
        if self.selected is not None:
            self.session.reject([self.selected])
            self._after_change()

    def _on_paint(self, layer) -> None:
        # napari (0.9) emits ``paint`` before it writes the pixels of a single paint or fill
        # call (a brush stroke's comes after): sync once the event loop is back
        QTimer.singleShot(0, lambda: self._sync_paint(layer))

    def _sync_paint(self, layer) -> None:
        if layer not in self.viewer.layers:
            return
        if layer_uid(layer) != layer_uid(self.layer):
            self.bind_layer(layer)
        self.session.sync_with_labels()
        self._after_change()

    def _on_points_data(self, layer) -> None:
        if layer_uid(layer) != layer_uid(self.layer):
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
            self.select(obj_id, zoom=True)

    def previous(self) -> None:
        if self.session is not None and (obj_id := self.session.previous()) is not None:
            self.select(obj_id, zoom=True)

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
            counts = session.class_counts()
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
        """Save every changed session next to its image (:mod:`.review_autosave`)."""
        from napari_hemato._widgets.review_autosave import save_sessions

        return save_sessions(self)
