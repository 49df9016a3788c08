"""Correct the masks of a whole-slide result where the pathologist is looking.

A whole-slide run's labels live in its result store, on the model's work grid,
too large to hold in memory. :func:`open_window` reads one box of them as an
ordinary in-memory :class:`~napari_hemato.core.annotations.AnnotationSet` (level-0
pixels), which review edits like any small result (paint, erase, fill, merge,
split, delete, undo). :func:`commit_window` writes it back:

- **Whole objects only.** The box asked for grows to hold every object it touches
  (from the table's boxes). Objects that the grown box still cuts (they touch only
  its margin) are *locked*: their pixels are written back as they were, and
  painting over them is undone; their class changes are kept.
- **No duplicate ids.** An id painted in the window that belongs to an object
  elsewhere on the slide gets a fresh id.
- **Exactly the stored grid.** Edits are taken to the work grid by the level-0
  pixel at the centre of each work pixel, only where that pixel was changed: what
  was not edited is written back bit for bit. The returned labels are the stored
  ones mapped back to level 0, and the table's geometry is measured on them.
- **All or nothing.** The store is written through its journal
  (:mod:`napari_hemato.core.store_edits`); a window whose stored labels changed since
  it was opened (another window saved over it) is refused, nothing written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import (
    AnnotationSet,
    level0_labels,
    region_metadata,
    work_window,
)
from napari_hemato.core.classes import UNASSIGNED
from napari_hemato.core.errors import HematoError, StoreError
from napari_hemato.core.measure import measure_labels, write_geometry
from napari_hemato.core.store_edits import merge_rows, write_edit
from napari_hemato.core.table import GEOMETRY_COLUMNS
from napari_hemato.core.tiling import Box

#: level-0 pixels of one edit window at most (uint32: 4 bytes each, held twice)
MAX_EDIT_PIXELS = 16_000_000
EDIT_KEY = "edit"


@dataclass
class Commit:
    """What :func:`commit_window` did."""

    table: pd.DataFrame          # the whole slide's table, edits merged
    labels: np.ndarray           # the window's labels as now stored (level 0)
    token: str                   # the store edit's token ("": no mask changed; see
                                 # store_edits.merge_missing)
    changed: list[int]           # ids whose pixels changed (new ones included)
    added: list[int]
    removed: list[int]
    kept_locked_px: int          # painted pixels on locked objects, put back as they were
    renumbered: dict[int, int]   # painted ids already used elsewhere -> their new ids


def grow_to_objects(table: pd.DataFrame, view: Box, roi: Box) -> Box:
    """``view`` grown to hold every object (table ``bbox_*``) it touches, inside ``roi``."""
    y0, x0, y1, x1 = (int(v) for v in view)
    if len(table):
        by0, bx0, by1, bx1 = (table[c].to_numpy(np.int64)
                              for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"))
        hit = (by0 < y1) & (y0 < by1) & (bx0 < x1) & (x0 < bx1)
        if hit.any():
            y0, x0 = min(y0, int(by0[hit].min())), min(x0, int(bx0[hit].min()))
            y1, x1 = max(y1, int(by1[hit].max())), max(x1, int(bx1[hit].max()))
    return (max(y0, roi[0]), max(x0, roi[1]), min(y1, roi[2]), min(x1, roi[3]))


def open_window(result, table: pd.DataFrame, view: Box, *,
                max_pixels: int = MAX_EDIT_PIXELS) -> AnnotationSet:
    """An editable in-memory set of the level-0 box ``view`` of ``result``'s labels, grown
    to whole objects, with ``table``'s rows (the slide's corrected table) for them."""
    grid = result.grid
    if result.labels() is None:
        raise HematoError(f"{result.path}: this run has no masks to edit (a point model)")
    box = grow_to_objects(table, view, grid.roi)
    h, w = box[2] - box[0], box[3] - box[1]
    if h <= 0 or w <= 0:
        raise HematoError("the view shows nothing of the analysed region: pan onto it")
    if h * w > max_pixels:
        raise HematoError(f"the view holds {h * w / 1e6:.0f} MP of masks; zoom in to "
                          f"{max_pixels / 1e6:.0f} MP or less to edit them")
    wb = work_window(grid, box)
    work = np.asarray(result.labels()[wb[0]:wb[2], wb[1]:wb[3]])
    labels = level0_labels(None, grid, box, work=work)
    present = np.unique(labels)
    present = present[present > 0]
    rows = table[table["id"].isin(present)].reset_index(drop=True)
    inside = ((rows["bbox_y0"] >= box[0]) & (rows["bbox_x0"] >= box[1])
              & (rows["bbox_y1"] <= box[2]) & (rows["bbox_x1"] <= box[3]))
    locked = sorted(set(present.tolist()) - set(rows.loc[inside, "id"].astype(int).tolist()))
    cfg = result.store.config
    max_id = int(max(table["id"].max() if len(table) else 0, present.max(initial=0)))
    meta = {"result": str(result.path),
            **region_metadata(box, None if grid.mpp_assumed else grid.mpp0),
            "max_id": max_id,
            EDIT_KEY: {"result": str(result.path), "box": [int(v) for v in box],
                       "locked": [int(v) for v in locked], "digest": _digest(work)}}
    return AnnotationSet("instances", rows, list(cfg["model"].get("class_names",
                                                                   result.spec.class_names)),
                         labels, (box[0], box[1]), cfg["slide"]["mpp"], cfg["slide"]["path"],
                         tuple(cfg["slide"]["shape"]), meta)


def commit_window(result, ann: AnnotationSet, table: pd.DataFrame) -> Commit:
    """Write the edited window ``ann`` (from :func:`open_window`) back into ``result``'s
    store and merge its rows into ``table`` (the slide's table); see the module notes."""
    edit = ann.metadata.get(EDIT_KEY)
    if not edit:
        raise HematoError("this layer is not an edit window of a whole-slide result")
    grid, box = result.grid, tuple(int(v) for v in edit["box"])
    wb = work_window(grid, box)
    w_old = np.asarray(result.labels()[wb[0]:wb[2], wb[1]:wb[3]])
    if _digest(w_old) != edit["digest"]:
        raise StoreError(f"{result.path}: the masks of this window were changed since it was "
                         "opened (another edit window saved over it); nothing was written. "
                         "Open Edit here again and redo the edits there")
    orig = level0_labels(None, grid, box, work=w_old)
    new = np.array(ann.labels, np.uint32)
    if new.shape != orig.shape:
        raise HematoError(f"the edit window's labels are {new.shape}, not {orig.shape}")
    rows = ann.table.set_index(ann.table["id"].astype(np.int64), drop=False)
    rows.index.name = None
    locked = np.asarray(edit["locked"], np.int64)
    cut = set(locked.tolist())
    keep = np.isin(orig, locked) | np.isin(new, locked)
    keep &= new != orig
    kept = int(keep.sum())
    new[keep] = orig[keep]
    before = set(np.unique(orig).tolist()) - {0}
    renumbered, rows = _fresh_ids(new, rows, before, table, int(ann.metadata.get("max_id", 0)))
    w_new = _to_work(new, orig, w_old, grid, box, wb)
    final = level0_labels(None, grid, box, work=w_new)
    diff = final != orig
    changed = sorted((set(np.unique(final[diff]).tolist()) | set(np.unique(orig[diff]).tolist()))
                     - {0} - cut)
    present = set(np.unique(final).tolist()) - {0}
    removed = sorted(before - present - cut)
    added = sorted(present - before)
    out = _rows(rows, table, present - cut, changed, set(added))
    if cut:  # their class corrections; their geometry is the slide's (whole) one
        cut_rows = rows.loc[rows.index.isin(locked)]
        out = pd.concat([out, _rows(cut_rows, table, set(cut_rows.index.tolist()), [], set())])
    out = _measure(out, final, [i for i in changed if i in present], box, grid.mpp0)
    token = ""  # only class changes: nothing to write into the store
    if not np.array_equal(w_new, w_old):
        token = write_edit(result.store, wb, w_old, w_new, out.reset_index(drop=True), removed)
    merged = merge_rows(table, out.reset_index(drop=True), removed)
    return Commit(merged, final, token, changed, added, removed, kept, renumbered)


def _digest(work: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(work, np.uint32).tobytes()).hexdigest()


def _fresh_ids(new: np.ndarray, rows: pd.DataFrame, before: set, table: pd.DataFrame,
               max_id: int) -> tuple[dict[int, int], pd.DataFrame]:
    """Renumber (labels in place; returns the renumbered rows) ids painted in the window that an object
    elsewhere on the slide already has."""
    painted = set(np.unique(new).tolist()) - {0} - before
    taken = set(table["id"].astype(np.int64).tolist())
    clash = sorted(painted & taken)
    if not clash:
        return {}, rows
    nxt = max(max_id, max(taken), max(painted)) + 1
    mapping = {old: nxt + k for k, old in enumerate(clash)}
    for old, fresh in mapping.items():
        new[new == old] = fresh
    rows = rows.rename(index=mapping)
    rows["id"] = rows.index.to_numpy(np.int64)
    return mapping, rows


def _to_work(new, orig, w_old, grid, box, wb) -> np.ndarray:
    """The work-grid window with the edits of ``new`` (vs ``orig``, level 0): a work pixel
    takes the level-0 pixel at the centre of its footprint where that pixel changed."""
    changed = new != orig
    picks = []
    for axis, (lo, hi) in enumerate(((wb[0], wb[2]), (wb[1], wb[3]))):
        start = grid.level0_start(np.arange(lo, hi + 1), axis)
        centre = (start[:-1] + start[1:] - 1) // 2 + grid.roi[axis] - box[axis]
        valid = (start[1:] > start[:-1]) & (centre >= 0) & (centre < new.shape[axis])
        picks.append((np.clip(centre, 0, new.shape[axis] - 1), valid))
    (cy, vy), (cx, vx) = picks
    take = changed[np.ix_(cy, cx)] & vy[:, None] & vx[None, :]
    out = w_old.copy()
    out[take] = new[np.ix_(cy, cx)][take]
    return out


def _rows(rows: pd.DataFrame, table: pd.DataFrame, ids: set, changed: list, added: set):
    """One row per object of the window: the window's own row (its class corrections),
    else the slide table's, else a blank hand-drawn one; changed model objects become
    ``corrected``."""
    have = rows.loc[rows.index.isin(list(ids))].copy()
    missing = sorted(ids - set(have.index.tolist()))
    if missing:
        from_table = table[table["id"].isin(missing)]
        extra = from_table.set_index(from_table["id"].astype(np.int64), drop=False)
        blank = sorted(set(missing) - set(extra.index.tolist()))
        if blank:
            frame = pd.DataFrame(index=blank, columns=rows.columns)
            frame["id"] = blank
            frame["class"] = UNASSIGNED
            if "class_auto" in frame:
                frame["class_auto"] = UNASSIGNED
            frame["provenance"], frame["reviewed"] = "manual", True
            extra = pd.concat([extra, frame])
        have = pd.concat([have, extra])
    # an object whose stored pixels did not change keeps the slide's geometry (the window's
    # session re-measures what is painted, even when the save then puts it back)
    same = have.index[~have.index.isin(changed) & have.index.isin(table["id"])]
    if len(same):
        whole = table.set_index(table["id"].astype(np.int64)).loc[same]
        geometry = [c for c in GEOMETRY_COLUMNS if c in have and c in whole]
        have.loc[same, geometry] = whole[geometry].to_numpy()
    edited = have.index.isin(changed) & (have["provenance"].astype(str) == "auto")
    have.loc[edited & ~have.index.isin(list(added)), "provenance"] = "corrected"
    return have.sort_index()


def _measure(rows: pd.DataFrame, labels: np.ndarray, ids, box: Box, mpp: float) -> pd.DataFrame:
    """Level-0 centroid, box and area of ``ids`` (as the review measures a painted object)."""
    if not ids:
        return rows
    rows = rows.copy()
    write_geometry(rows, measure_labels(labels, ids, origin=box[:2], mpp=mpp))
    return rows
