"""Issue 12 item 4: masks of a whole-slide result corrected in a window, written back.

Invariants, on a real run of the fake blob model (work grid = image, and resampled):
the window holds whole objects; saving an untouched window changes no stored bit;
after edits the stored labels and the table agree everywhere (every id in the
labels has one row whose box and area are its level-0 pixels); pixels outside the
window never change; objects cut by the window's edge keep their pixels; painted
ids never duplicate an object elsewhere; a save killed half-way is finished at the
next open; a window saved over by another is refused with nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.annotations import from_result
from napari_hemato.core.engine import open_result, run
from napari_hemato.core.errors import HematoError, StoreError
from napari_hemato.core.region_edit import commit_window, open_window
from napari_hemato.core.review import ReviewSession
from napari_hemato.core.slide import open_slide
from napari_hemato.core.store import ResultStore
from napari_hemato.core.store_edits import edits, merge_missing
from napari_hemato.models.fake import DarkBlobPredictor, fake_spec

from .synthetic import disk_image, write_tiff
from .test_object_geometry import assert_table_is_the_label_image


@pytest.fixture(params=[0.5, 0.3], ids=["work-grid-is-image", "resampled"])
def result(request, tmp_path):
    slide = open_slide(write_tiff(tmp_path / "s.tif", disk_image((300, 400), n=60, seed=3)),
                       mpp=request.param)
    predictor = DarkBlobPredictor(fake_spec(tile=64, max_object_um=12.0))
    return run(slide, predictor, out=tmp_path / "r.zarr")


def whole_labels(result) -> np.ndarray:
    return from_result(result).labels


def assert_consistent(result, table) -> None:
    """The stored labels and ``table`` describe the same objects, pixel for pixel."""
    assert table["id"].is_unique
    assert_table_is_the_label_image(table, whole_labels(result), result.grid.roi)


def test_window_holds_whole_objects_and_locks_the_cut_ones(result):
    table = result.table()
    view = (100, 100, 160, 200)
    ann = open_window(result, table, view)
    box = ann.metadata["edit"]["box"]
    assert box[0] <= 100 and box[2] >= 160 and box[1] <= 100 and box[3] >= 200
    np.testing.assert_array_equal(ann.labels, from_result(result, roi=tuple(box)).labels)
    rows = ann.table.set_index("id")
    touching_view = table[(table.bbox_y0 < 160) & (table.bbox_y1 > 100)
                          & (table.bbox_x0 < 200) & (table.bbox_x1 > 100)]["id"]
    assert len(touching_view) >= 3
    locked = set(ann.metadata["edit"]["locked"])
    assert not locked & set(touching_view)  # every object the view touches is whole
    for obj_id, row in rows.iterrows():
        inside = (row.bbox_y0 >= box[0] and row.bbox_x0 >= box[1]
                  and row.bbox_y1 <= box[2] and row.bbox_x1 <= box[3])
        assert inside == (obj_id not in locked)


def test_saving_an_untouched_window_changes_nothing(result):
    table = result.table()
    before = np.asarray(result.labels()[:])
    ann = open_window(result, table, (50, 50, 200, 250))
    done = commit_window(result, ann, table)
    np.testing.assert_array_equal(np.asarray(result.labels()[:]), before)
    assert done.changed == done.added == done.removed == []
    assert done.table.equals(table)


def test_edits_are_written_back_whole_and_consistent(result):
    table = result.table()
    before = np.asarray(result.labels()[:])
    ann = next(a for y in range(0, 140, 10) for x in range(0, 180, 10)
               if (a := open_window(result, table, (y + 60, x + 80, y + 160, x + 220)))
               .metadata["edit"]["locked"])  # a window whose edge cuts an object
    locked = ann.metadata["edit"]["locked"]
    session = ReviewSession(ann)
    inside = [i for i in ann.table["id"] if i not in locked]
    a, b, c = inside[:3]
    session.set_class([a], "rejected")
    session.delete([b])
    # paint a new object with the id of an object elsewhere on the slide (napari's "new
    # label" only knows the window), and paint over a locked object
    elsewhere = int(table.loc[~table["id"].isin(ann.table["id"]), "id"].iloc[0])
    labels = session.labels
    free = np.argwhere(labels == 0)
    y, x = free[len(free) // 2]
    labels[max(y - 3, 0):y + 3, max(x - 3, 0):x + 3][labels[max(y - 3, 0):y + 3,
                                                             max(x - 3, 0):x + 3] == 0] = elsewhere
    labels[labels == locked[0]] = c  # "fill" the cut object with the id of another
    session.sync_with_labels()
    done = commit_window(result, session.to_annotations(), table)

    after = np.asarray(result.labels()[:])
    wb = done_box = ann.metadata["edit"]["box"]
    assert done.removed == [b] and b not in done.table["id"].to_numpy()
    assert done.kept_locked_px > 0  # the cut object's pixels were put back
    assert elsewhere in done.renumbered and done.renumbered[elsewhere] not in table["id"].to_numpy()
    [new_id] = done.added
    assert new_id == done.renumbered[elsewhere]
    rows = done.table.set_index("id")
    assert rows.loc[a, "class"] == "rejected" and rows.loc[new_id, "class"] == "unassigned"
    assert rows.loc[new_id, "provenance"] == "manual"
    assert rows.loc[elsewhere, "area_px"] == table.set_index("id").loc[elsewhere, "area_px"]
    assert_consistent(result, done.table)
    # outside the window (on the work grid) nothing moved
    from napari_hemato.core.annotations import work_window

    y0, x0, y1, x1 = work_window(result.grid, tuple(done_box))
    outside = np.ones(before.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(after[outside], before[outside])
    # the cut object is as it was, everywhere
    np.testing.assert_array_equal(after == locked[0], before == locked[0])
    np.testing.assert_array_equal(done.labels, from_result(result, roi=tuple(wb)).labels)
    # a resume sees sealed chunks, not damaged ones; the edit is in the store's journal
    leftover = result.path / "edits" / ".000002.pending.npz.x1y2.tmp"  # a killed journal write
    leftover.write_bytes(b"half")
    assert ResultStore.open(result.path).verify() == ([], [])
    assert not leftover.exists()
    [entry] = edits(result.store)
    assert entry.token == done.token


def test_a_save_killed_half_way_is_finished_at_the_next_open(result, monkeypatch):
    import napari_hemato.core.store_edits as journal

    table = result.table()
    ann = open_window(result, table, (40, 40, 200, 200))
    session = ReviewSession(ann)
    victim = int(ann.table["id"].iloc[0])
    if victim in ann.metadata["edit"]["locked"]:
        victim = int(next(i for i in ann.table["id"] if i not in ann.metadata["edit"]["locked"]))
    session.delete([victim])
    before = np.asarray(result.labels()[:])

    def killed(store, pending):
        raise KeyboardInterrupt  # the process dies after the journal, before the labels

    monkeypatch.setattr(journal, "_apply", killed)
    with pytest.raises(KeyboardInterrupt):
        commit_window(result, session.to_annotations(), table)
    np.testing.assert_array_equal(np.asarray(result.labels()[:]), before)
    monkeypatch.undo()
    reopened = open_result(result.path)  # replays the journal
    assert not (reopened.labels()[:] == victim).any()
    # the table saved elsewhere (the sidecar) missed the edit: it is merged from the store
    merged, tokens = merge_missing(table, reopened.store, [])
    assert victim not in merged["id"].to_numpy() and len(tokens) == 1
    assert_consistent(reopened, merged)
    assert merge_missing(merged, reopened.store, tokens)[0].equals(merged)


def test_a_window_saved_over_is_refused(result):
    table = result.table()
    first = open_window(result, table, (50, 50, 200, 200))
    second = open_window(result, table, (100, 100, 250, 250))
    shared = sorted((set(first.table["id"]) - set(first.metadata["edit"]["locked"]))
                    & set(np.unique(second.labels).tolist()))
    assert shared, "the test needs an object in both windows"
    s1 = ReviewSession(first)
    s1.delete([shared[0]])
    done = commit_window(result, s1.to_annotations(), table)
    assert done.removed == [shared[0]]
    stored = np.asarray(result.labels()[:])
    s2 = ReviewSession(second)
    s2.delete([shared[-1]])
    with pytest.raises(StoreError, match="changed since it was opened"):
        commit_window(result, s2.to_annotations(), done.table)
    np.testing.assert_array_equal(np.asarray(result.labels()[:]), stored)
    assert len(edits(result.store)) == 1


def test_a_view_too_large_or_off_the_region_is_refused(result):
    table = result.table()
    with pytest.raises(HematoError, match="zoom in"):
        open_window(result, table, (0, 0, 300, 400), max_pixels=10_000)
    with pytest.raises(HematoError, match="pan onto it"):
        open_window(result, table, (500, 500, 600, 600))


def test_new_ids_of_a_window_session_start_above_the_slides(result):
    table = result.table()
    ann = open_window(result, table, (0, 0, 60, 60))
    session = ReviewSession(ann)
    assert session._next_id() > int(table["id"].max())
