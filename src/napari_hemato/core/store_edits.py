"""Mask corrections written back into a run's result store, all or nothing.

A saved "Edit here" window changes a box of the store's work-grid labels
(``labels/0``). The change is first written whole as a journal entry, then
applied; so a process killed half-way through is finished at the next open::

    edits/000001.pending.npz   written first (box, labels before and after, rows)
    labels/0/...               then the chunks the box touches
    assembled/NNNNNN           their markers get the new chunks' digests
    edits/000001.npz           renamed last: the entry is applied

:func:`replay_pending` (run by :meth:`ResultStore.open`) applies every pending
entry again (applying one twice gives the same labels). Every entry keeps the
object rows the edit produced (``rows``, CSV) and the ids it removed, under a
random ``token``: an object table saved elsewhere (the image's sidecar) records
the tokens it has merged, and :func:`merge_missing` brings a table that missed one
(a crash between the store and the sidecar write) up to date.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core import label_pyramid
from napari_hemato.core.errors import StoreError

log = logging.getLogger(__name__)

EDITS = "edits"
#: a table's metadata key listing the store edits merged into it
MERGED_KEY = "mask_edits"


@dataclass(frozen=True)
class LabelEdit:
    """One journal entry: work-grid ``box`` (y0, x0, y1, x1) went from ``before`` to ``after``."""

    token: str
    box: tuple[int, int, int, int]
    before: np.ndarray
    after: np.ndarray
    rows: pd.DataFrame
    dropped: np.ndarray
    time: float


def write_edit(store, box, before: np.ndarray, after: np.ndarray, rows: pd.DataFrame,
               dropped) -> str:
    """Journal, apply and seal one edit of ``store``'s labels; returns its token."""
    from napari_hemato.core.store import _atomic_write

    if before.shape != after.shape or before.shape != (box[2] - box[0], box[3] - box[1]):
        raise ValueError(f"edit of box {box}: before {before.shape} and after {after.shape} "
                         "do not match it")
    folder = store.path / EDITS
    folder.mkdir(exist_ok=True)
    token = uuid.uuid4().hex
    seq = 1 + max((int(p.name.split(".")[0]) for p in folder.glob("*.npz")
                   if p.name.split(".")[0].isdigit()), default=0)
    buf = io.BytesIO()
    np.savez_compressed(
        buf, box=np.asarray(box, np.int64), before=before.astype(np.uint32),
        after=after.astype(np.uint32), dropped=np.asarray(dropped, np.int64),
        rows=np.frombuffer(rows.to_csv(index=False).encode(), np.uint8),
        meta=np.frombuffer(json.dumps({"token": token, "time": time.time()}).encode(), np.uint8))
    pending = folder / f"{seq:06d}.pending.npz"
    _atomic_write(pending, buf.getvalue())
    _apply(store, pending)
    return token


def replay_pending(store) -> int:
    """Finish every edit a killed process left pending; returns how many."""
    folder = store.path / EDITS
    if not folder.is_dir():
        return 0
    pending = sorted(folder.glob("*.pending.npz"))
    for path in pending:
        log.warning("%s: a saved mask edit was interrupted; applying it again", path)
        _apply(store, path)
    return len(pending)


def _apply(store, pending: Path) -> None:
    edit = _read(pending)
    y0, x0, y1, x1 = edit.box
    labels = store.labels
    if labels is None:
        raise StoreError(f"{store.path}: has no labels to edit")
    labels[y0:y1, x0:x1] = edit.after
    label_pyramid.update(store.group, edit.box)
    _reseal_markers(store, edit.box)
    os.replace(pending, pending.with_name(pending.name.replace(".pending", "")))


def _reseal_markers(store, box) -> None:
    """Give the ``assembled/`` markers of the chunks ``box`` touches their new digests, so
    a resume does not take the edited chunks for damaged ones and assemble them again."""
    from napari_hemato.core.store import _atomic_write, _digest

    y0, x0, y1, x1 = box
    for marker in (store.path / "assembled").iterdir():
        if not marker.name.isdigit():
            continue
        try:
            record = json.loads(marker.read_text() or "{}")
            by0, bx0, by1, bx1 = record["box"]
        except (OSError, ValueError, KeyError):
            continue  # verify() deals with a damaged marker
        if by0 < y1 and y0 < by1 and bx0 < x1 and x0 < bx1:
            record["sha256"] = _digest(store._chunk_file(record["box"]))
            _atomic_write(marker, json.dumps(record).encode())


def _read(path: Path) -> LabelEdit:
    from napari_hemato.core.table import read_table_csv

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            rows = read_table_csv(io.BytesIO(data["rows"].tobytes()))
            return LabelEdit(meta["token"], tuple(int(v) for v in data["box"]), data["before"],
                             data["after"], rows, data["dropped"], float(meta["time"]))
    except (OSError, ValueError, KeyError) as err:
        raise StoreError(f"{path}: unreadable mask edit ({err})") from None


def edits(store) -> list[LabelEdit]:
    """The applied edits of ``store``, oldest first."""
    folder = store.path / EDITS
    if not folder.is_dir():
        return []
    return [_read(p) for p in sorted(folder.glob("*.npz")) if ".pending" not in p.name]


def merge_rows(table: pd.DataFrame, rows: pd.DataFrame, dropped) -> pd.DataFrame:
    """``table`` with the ``dropped`` ids removed and ``rows`` put in by id (a row whose id
    is already there replaces it in place; new ids are appended)."""
    out = table[~table["id"].isin(np.asarray(dropped, np.int64))]
    rows = rows.reindex(columns=out.columns.union(rows.columns, sort=False))
    known = out["id"].isin(rows["id"])
    if known.any():
        out = out.set_index("id", drop=False)
        update = rows.set_index("id", drop=False)
        update = update.loc[update.index.isin(out.index)]
        for col in update.columns:
            if col not in out.columns:
                out[col] = pd.Series(index=out.index, dtype=update[col].dtype)
            out.loc[update.index, col] = update[col].to_numpy()
        out = out.reset_index(drop=True)
    new = rows[~rows["id"].isin(table["id"])]
    if len(new):
        out = pd.concat([out, new[out.columns.intersection(new.columns, sort=False)]],
                        ignore_index=True)
    out = out.reset_index(drop=True)
    out["id"] = out["id"].astype(np.int64)
    return out


def merge_missing(table: pd.DataFrame, store, merged) -> tuple[pd.DataFrame, list[str]]:
    """``table`` with every applied edit of ``store`` not in ``merged`` (tokens) merged in,
    and the tokens now merged."""
    merged = list(merged or ())
    for edit in edits(store):
        if edit.token not in merged:
            log.warning("%s: merging a saved mask edit the object table had missed", store.path)
            table = merge_rows(table, edit.rows, edit.dropped)
            merged.append(edit.token)
    return table, merged
