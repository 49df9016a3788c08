"""Review and correction of objects, Qt-free: the logic behind the review panel.

A :class:`ReviewSession` owns an :class:`~napari_hemato.core.annotations.AnnotationSet`
(its label image is shared with the napari Labels layer, so painting edits it in
place) and keeps the object table in step with every correction:

- class changes mark ``provenance = "corrected"`` (the model's original call is
  kept in ``class_auto``); a class of the task's :class:`ClassHierarchy` also sets
  the object's type column (``cell_type``), so it moves between the counts;
- every action (class, reviewed, accept/reject, merge, split, delete, painting,
  points moved) is one step that :meth:`ReviewSession.undo` and
  :meth:`ReviewSession.redo` take back and replay, label pixels included;
- objects painted with a new id get class ``unassigned`` and provenance
  ``manual``; deleted objects leave the table; merge and split update both;
- a queue walks the objects most in need of a human first.

Every mutating method bumps :attr:`revision`, which the autosave watches.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.classes import REJECTED, UNASSIGNED, ClassHierarchy
from napari_hemato.core.measure import measure_labels, write_geometry
from napari_hemato.core.review_points import PointEdits
from napari_hemato.core.review_steps import Step, recorded

__all__ = ["REJECTED", "UNASSIGNED", "ReviewSession"]


class ReviewSession(PointEdits):
    """Corrections on one annotation set.

    Examples
    --------
    >>> s = ReviewSession(annotations, hierarchy=task.hierarchy(annotations))  # doctest: +SKIP
    >>> s.set_class([12], "EO"); s.mark_reviewed([12]); s.undo(); s.undo(); s.redo()  # doctest: +SKIP
    """

    def __init__(self, annotations: AnnotationSet, *,
                 hierarchy: ClassHierarchy | None = None) -> None:
        self.annotations = annotations
        self.hierarchy = hierarchy or ClassHierarchy.flat(annotations.class_names)
        table = annotations.table.copy()
        if "class_auto" not in table:
            table["class_auto"] = table["class"] if len(table) else pd.Series(dtype=object)
        table["reviewed"] = table["reviewed"].astype(bool) if len(table) else table["reviewed"]
        self.table = table.set_index("id", drop=False)
        self.table.index.name = None
        self._undo: list[Step] = []
        self._redo: list[Step] = []
        self._depth = 0
        # the label image as of the last recorded step: painting is diffed against it
        self._shadow = None if annotations.labels is None else np.array(annotations.labels)
        self.revision = 0
        #: ids whose rows the last revision changed (None: any row, or label pixels)
        self.last_changed: list[int] | None = None
        self._counts: pd.Series | None = None
        self._queue: list[int] = []
        self._cursor = -1
        self.queue_mode = "uncertain"
        self._max_id = 0
        # the largest id in use at the start; an edit window of a whole slide knows the slide's
        self._max_id = max(self._next_id() - 1, int(annotations.metadata.get("max_id", 0)))

    # -- basic access -----------------------------------------------------------
    @property
    def labels(self) -> np.ndarray | None:
        return self.annotations.labels

    @property
    def class_names(self) -> list[str]:
        return list(self.annotations.class_names)

    def row(self, obj_id: int) -> pd.Series:
        return self.table.loc[int(obj_id)]

    def probabilities(self, obj_id: int) -> dict[str, float]:
        row = self.row(obj_id)
        values = pd.to_numeric(pd.Series([row.get(f"prob_{c}", np.nan) for c in self.class_names],
                                         dtype=object), errors="coerce")
        return dict(zip(self.class_names, values.astype(float), strict=True))

    def to_annotations(self) -> AnnotationSet:
        """The corrected set (a copy of the table; the same label image)."""
        a = self.annotations
        return AnnotationSet(a.kind, self.table.reset_index(drop=True).copy(), self.class_names,
                             a.labels, a.origin, a.mpp, a.image_path, a.image_shape, dict(a.metadata))

    def _changed(self, ids: list[int] | None = None, before: pd.DataFrame | None = None,
                 after: pd.DataFrame | None = None) -> None:
        """A new revision. ``ids``: the only rows it changed (values, not which rows exist),
        from ``before`` to ``after`` (their classes keep :meth:`class_counts` current)."""
        self.revision += 1
        self.last_changed = None if ids is None else list(ids)
        if ids is None or before is None or self._counts is None:
            self._counts = None
        else:
            counts = self._counts.add(after["class"].astype(str).value_counts(), fill_value=0)
            self._counts = counts.sub(before["class"].astype(str).value_counts(), fill_value=0)

    def class_counts(self) -> pd.Series:
        """Objects per class, sorted by name. Kept up to date step by step: a class change on
        a million rows does not count them all again."""
        if self._counts is None:
            self._counts = self.table["class"].astype(str).value_counts()
        counts = self._counts[self._counts > 0].astype(int)
        return counts.sort_index()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @contextmanager
    def _step(self, action: str, ids=None):
        """Record what the body changes as one undoable step (nested steps join the outer).

        ``ids``: the body changes only these rows' values (cheap on big tables);
        otherwise the whole table and the label pixels are compared before and after."""
        if self._depth:
            yield
            return
        self._depth += 1
        try:
            ids = None if ids is None else [int(i) for i in ids]
            before = self.table.loc[ids].copy() if ids is not None else self.table.copy()
            yield
            after = self.table.loc[ids].copy() if ids is not None else self.table.copy()
            pixels = None
            if ids is None and self._shadow is not None:
                changed = np.flatnonzero(self.labels.ravel() != self._shadow.ravel())
                if changed.size:
                    pixels = (changed, self._shadow.ravel()[changed].copy(),
                              self.labels.ravel()[changed].copy())
                    self._shadow.ravel()[changed] = pixels[2]
            if ids is None and pixels is None and before.equals(after):
                return  # a sync that found nothing; a user's action is a step even when idle
            self._undo.append(Step(action, before, after, ids, pixels))
            self._redo.clear()
            self._changed(ids if pixels is None else None, before, after)
        finally:
            self._depth -= 1

    def _apply(self, step: Step, *, forward: bool) -> None:
        rows = step.after if forward else step.before
        if step.ids is None:
            self.table = rows.copy()
        else:
            present = [i for i in step.ids if i in self.table.index]
            current = self.table.loc[present].copy()
            self.table.loc[present, rows.columns] = rows.loc[present].to_numpy()
        if step.pixels is not None:
            index, old, new = step.pixels
            values = new if forward else old
            self.labels.ravel()[index] = values
            self._shadow.ravel()[index] = values
        if step.ids is None or step.pixels is not None:
            self._changed()
        else:
            self._changed(step.ids, current, self.table.loc[present])

    def undo(self) -> str | None:
        """Take back the last action; its name, or None when there is nothing to undo."""
        return self._move_step(self._undo, self._redo, forward=False)

    def redo(self) -> str | None:
        """Replay the last undone action; its name, or None when there is nothing to redo."""
        return self._move_step(self._redo, self._undo, forward=True)

    def _move_step(self, source: list[Step], target: list[Step], *, forward: bool) -> str | None:
        """Apply the last step of ``source`` (forward: redo, else undo) and move it to ``target``."""
        if not source:
            return None
        step = source.pop()
        self._apply(step, forward=forward)
        target.append(step)
        return step.action

    # -- classes ------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Every class an object may be given: the hierarchy's, then any other of the set's."""
        return list(dict.fromkeys([*self.hierarchy.classes, *self.class_names]))

    def set_class(self, ids, name: str) -> None:
        """Give ``ids`` the class ``name`` (provenance becomes corrected/manual).

        A class of the hierarchy also sets the type column (``cell_type``): a red cell
        given a white-cell subtype becomes a WBC and moves between the counts."""
        if name not in self.classes and name not in (UNASSIGNED, REJECTED):
            raise ValueError(f"unknown class {name!r}; choose from {self.classes}")
        ids = [int(i) for i in np.atleast_1d(ids)]
        missing = [i for i in ids if i not in self.table.index]
        if missing:
            raise KeyError(f"no object(s) with id {missing}")
        with self._step("set class", ids):
            self.table.loc[ids, "class"] = name
            column, kind = self.hierarchy.type_column, self.hierarchy.type_of(name)
            if column and kind is not None and column in self.table:
                self.table.loc[ids, column] = kind
            auto = self.table.loc[ids, "provenance"] == "auto"
            self.table.loc[[i for i, a in zip(ids, auto, strict=True) if a], "provenance"] = "corrected"
            self.table.loc[ids, "reviewed"] = True

    def mark_reviewed(self, ids, reviewed: bool = True) -> None:
        ids = [int(i) for i in np.atleast_1d(ids)]
        with self._step("reviewed", ids):
            self.table.loc[ids, "reviewed"] = reviewed

    # -- review queue -------------------------------------------------------------
    def build_queue(self, *, mode: str = "uncertain", only_unreviewed: bool = True) -> list[int]:
        """Order objects for review: ``uncertain`` (smallest top-2 margin first),
        ``confidence`` (lowest first) or ``class:<NAME>`` (that class, least confident first)."""
        t = self.table
        if only_unreviewed:
            t = t[~t["reviewed"].astype(bool)]
        if mode.startswith("class:"):
            t = t[t["class"] == mode.split(":", 1)[1]]
            key = t["confidence"].to_numpy(float)
        elif mode == "confidence":
            key = t["confidence"].to_numpy(float)
        elif mode == "uncertain":
            # at the deepest level each row has probabilities for: NaN ones are absent
            key = self.hierarchy.margins(t)
        else:
            raise ValueError(f"unknown queue mode {mode!r}")
        self.queue_mode = mode
        order = np.lexsort((t.index.to_numpy(), np.nan_to_num(key, nan=-1.0)))
        self._queue = [int(i) for i in t.index.to_numpy()[order]]
        self._cursor = -1
        return list(self._queue)

    def next(self) -> int | None:
        """The next object in the queue (skipping deleted ones), None at the end."""
        while self._cursor + 1 < len(self._queue):
            self._cursor += 1
            if self._queue[self._cursor] in self.table.index:
                return self._queue[self._cursor]
        return None

    def previous(self) -> int | None:
        while self._cursor > 0:
            self._cursor -= 1
            if self._queue[self._cursor] in self.table.index:
                return self._queue[self._cursor]
        return None

    @property
    def progress(self) -> tuple[int, int]:
        """(reviewed, total) objects."""
        return int(self.table["reviewed"].astype(bool).sum()), len(self.table)

    def adopt_table(self, table: pd.DataFrame) -> None:
        """Take ``table`` as this set's table: a whole slide's, after an edit window saved
        its masks into the slide (:mod:`~napari_hemato.core.region_edit`). The pixels are in
        the store by then, so this is not undoable, and the history ends here."""
        table = table.copy()
        if "class_auto" not in table:
            table["class_auto"] = table["class"]
        self.table = table.set_index(table["id"].astype(np.int64), drop=False)
        self.table.index.name = None
        self._undo.clear()
        self._redo.clear()
        self._max_id = max(self._max_id, int(self.table.index.max()) if len(self.table) else 0)
        self._changed()

    # -- geometry edits (instances) ----------------------------------------------
    def _require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("this annotation set has no label image to edit")
        return self.labels

    def _measure(self, ids) -> None:
        """Recompute centroid, bbox and area of ``ids`` from the label image."""
        labels = self._require_labels()
        values = measure_labels(labels, ids, origin=self.annotations.origin,
                                mpp=self.annotations.mpp)
        if values["id"].size:
            write_geometry(self.table, values)

    def _next_id(self) -> int:
        """A fresh id, never reusing one of a deleted object."""
        used = [self._max_id, int(self.table.index.max()) if len(self.table) else 0]
        if self.labels is not None:
            used.append(int(self.labels.max()))
        self._max_id = max(used) + 1
        return self._max_id

    def _new_row(self, obj_id: int, *, like: int | None = None, provenance="manual") -> None:
        if like is not None:
            row = self.table.loc[[like]].copy()
        else:
            row = pd.DataFrame({c: [_blank(self.table[c])] for c in self.table.columns})
            row["class"] = row["class_auto"] = UNASSIGNED
        row.index = [obj_id]
        row["id"] = obj_id
        row["provenance"] = provenance
        row["reviewed"] = like is None
        self.table = pd.concat([self.table, row])
        self._max_id = max(self._max_id, obj_id)

    @recorded('paint')
    def sync_with_labels(self) -> tuple[list[int], list[int]]:
        """After painting: add rows for new ids, drop rows whose pixels are gone.

        Returns ``(added, removed)`` ids.
        """
        labels = self._require_labels()
        present = set(np.unique(labels).tolist()) - {0}
        known = set(self.table.index.tolist())
        added, removed = sorted(present - known), sorted(known - present)
        if removed:
            self.table = self.table.drop(index=removed)
        for obj_id in added:
            self._new_row(obj_id)
        # re-measure only the objects whose pixels changed since the last step (a paint
        # touches a few of the thousands a whole view holds)
        if self._shadow is not None and self._shadow.shape == labels.shape:
            diff = labels != self._shadow
            touched = set(np.unique(labels[diff]).tolist()) | set(np.unique(self._shadow[diff]).tolist())
        else:
            touched = present
        self._measure(sorted((touched & present) | set(added)))
        if added or removed:
            self._changed()
        return added, removed

    @recorded('delete')
    def delete(self, ids) -> None:
        ids = [int(i) for i in np.atleast_1d(ids)]
        if self.labels is not None:
            self.labels[np.isin(self.labels, ids)] = 0
        self.table = self.table.drop(index=[i for i in ids if i in self.table.index])
        self._changed()

    @recorded('merge')
    def merge(self, keep: int, other: int) -> None:
        """Merge ``other`` into ``keep`` (mask and table)."""
        labels = self._require_labels()
        labels[labels == other] = keep
        self.table = self.table.drop(index=[other])
        if self.table.loc[keep, "provenance"] == "auto":
            self.table.loc[keep, "provenance"] = "corrected"
        self._measure([keep])
        self._changed()

    @recorded('split')
    def split(self, obj_id: int) -> int:
        """Split an object in two along its narrowest waist; returns the new id."""
        labels = self._require_labels()
        mask = labels == obj_id
        if mask.sum() < 4:
            raise ValueError(f"object {obj_id} is too small to split")
        sl = ndi.find_objects(mask.astype(np.uint8))[0]
        sub = mask[sl]
        dist = ndi.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]
        ys, xs = np.nonzero(sub)
        coords = np.column_stack([ys, xs]).astype(float)
        # two seeds: the farthest-apart pair of the object's principal axis ends
        centred = coords - coords.mean(0)
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        proj = centred @ axis
        markers = np.zeros(sub.shape, np.int32)
        a, b = np.argmin(proj), np.argmax(proj)
        markers[ys[a], xs[a]], markers[ys[b], xs[b]] = 1, 2
        parts = watershed(-dist, markers, mask=sub)
        new_id = self._next_id()
        region = labels[sl]
        region[(parts == 2) & sub] = new_id
        self._new_row(new_id, like=obj_id, provenance="corrected")
        if self.table.loc[obj_id, "provenance"] == "auto":
            self.table.loc[obj_id, "provenance"] = "corrected"
        self._measure([obj_id, new_id])
        self._changed()
        return new_id


#: text columns of the object table; any other column of an empty table is numeric
TEXT_COLUMNS = {"class", "class_auto", "cell_type", "provenance", "model", "model_version",
                "slide", "path", "split"}


def _blank(column: pd.Series):
    """An empty value of a column's kind (NaN, "" or False). An empty table (a run that
    found nothing) has object columns: only its text columns take ""."""
    if pd.api.types.is_bool_dtype(column) or column.name == "reviewed":
        return False
    if pd.api.types.is_numeric_dtype(column) or (not len(column) and column.name not in TEXT_COLUMNS):
        return np.nan
    return ""
