"""Point edits of a review session (mitoses): add, follow the layer, move, accept, reject.

A mixin of :class:`napari_hemato.core.review.ReviewSession`: it uses the session's
``table``, ``annotations``, ``_step``, ``_new_row``, ``_next_id`` and ``_changed``.
"""

from __future__ import annotations

import numpy as np

from napari_hemato.core.classes import REJECTED
from napari_hemato.core.review_steps import recorded


class PointEdits:
    """Corrections of a points set; every method is one undoable step."""

    @recorded('add point')
    def add_point(self, y: float, x: float, *, name: str | None = None) -> int:
        """A manual point at level-0 (y, x); returns its id."""
        new_id = self._next_id()
        self._new_row(new_id)
        mpp = self.annotations.mpp or np.nan
        for k, v in {"y": y, "x": x, "y_um": y * mpp, "x_um": x * mpp, "area_px": 0.0,
                     "bbox_y0": int(y), "bbox_x0": int(x), "bbox_y1": int(y) + 1,
                     "bbox_x1": int(x) + 1}.items():
            self.table.loc[new_id, k] = v
        if name is not None:
            self.table.loc[new_id, "class"] = name
        self._changed()
        return new_id

    @recorded('edit points')
    def sync_points(self, yx: np.ndarray, ids: np.ndarray) -> tuple[list[int], list[int], list[int]]:
        """Follow a points layer: ``yx`` level-0 coordinates, ``ids`` (-1 = a new point).

        New points get fresh ids (class ``unassigned``, provenance ``manual``),
        moved ones become ``corrected``, missing ones leave the table, and the table
        follows the layer's point order. Returns ``(added, removed, moved)`` ids;
        ``ids`` is updated in place.
        """
        yx = np.asarray(yx, float).reshape(-1, 2)
        ids = np.asarray(ids)
        known = set(self.table.index.tolist())
        removed = sorted(known - {int(i) for i in ids if i >= 0})
        if removed:
            self.table = self.table.drop(index=removed)
        added, moved, seen = [], [], set()
        for k, obj_id in enumerate(ids):
            y, x = yx[k]
            # napari copies the selected point's features into a new point: a repeated id is new
            if obj_id < 0 or obj_id not in self.table.index or obj_id in seen:
                ids[k] = self.add_point(y, x)
                added.append(int(ids[k]))
            elif not np.allclose(self.table.loc[obj_id, ["y", "x"]].to_numpy(float), (y, x)):
                self.move_point(int(obj_id), y, x)
                moved.append(int(obj_id))
            seen.add(int(ids[k]))
        self.table = self.table.loc[[int(i) for i in ids]] if len(ids) else self.table.iloc[:0]
        if removed:
            self._changed()
        return added, removed, moved

    def accept(self, ids) -> None:
        """Confirm detections as they are (reviewed, class unchanged)."""
        ids = [int(i) for i in np.atleast_1d(ids)]
        with self._step("accept", ids):
            self.mark_reviewed(ids, True)

    def reject(self, ids) -> None:
        """Mark detections as false positives (class ``rejected``, kept for training)."""
        ids = [int(i) for i in np.atleast_1d(ids)]
        with self._step("reject", ids):
            self.set_class(ids, REJECTED)

    @recorded('move point')
    def move_point(self, obj_id: int, y: float, x: float) -> None:
        mpp = self.annotations.mpp or np.nan
        self.table.loc[obj_id, ["y", "x", "y_um", "x_um"]] = [y, x, y * mpp, x * mpp]
        if self.table.loc[obj_id, "provenance"] == "auto":
            self.table.loc[obj_id, "provenance"] = "corrected"
        self._changed()
