"""Review logic: corrections keep the table and the label image in step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.review import REJECTED, UNASSIGNED, ReviewSession
from napari_hemato.tasks.mitosis import hotspot, mitotic_count
from napari_hemato.tasks.smear import differential

CLASSES = ["SNE", "LY", "MO"]


def make_session(origin=(100, 200)) -> ReviewSession:
    labels = np.zeros((60, 80), np.uint32)
    labels[5:15, 5:15] = 1
    labels[20:30, 40:70] = 2  # an elongated object to split
    labels[40:50, 10:20] = 3
    labels[40:50, 20:30] = 4  # touches 3: merge candidates
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    rows = []
    for i, p in enumerate(probs, start=1):
        ys, xs = np.nonzero(labels == i)
        rows.append({
            "id": i, "y": ys.mean() + origin[0], "x": xs.mean() + origin[1],
            "y_um": 0.0, "x_um": 0.0, "bbox_y0": 0, "bbox_x0": 0, "bbox_y1": 0, "bbox_x1": 0,
            "area_px": float(ys.size), "area_um2": 0.0, "class": CLASSES[int(np.argmax(p))],
            "confidence": float(p.max()), "score": 0.9,
            **{f"prob_{c}": float(v) for c, v in zip(CLASSES, p, strict=True)},
            "model": "m", "model_version": "1", "provenance": "auto", "reviewed": False, "tile": 0,
        })
    ann = AnnotationSet("instances", pd.DataFrame(rows), CLASSES, labels, origin=origin, mpp=0.5)
    return ReviewSession(ann)


def test_class_change_marks_corrected_and_undo_restores():
    s = make_session()
    s.set_class([2], "MO")
    row = s.row(2)
    assert (row["class"], row["class_auto"], row["provenance"], row["reviewed"]) == ("MO", "SNE", "corrected", True)
    assert s.revision == 1
    assert s.undo()
    row = s.row(2)
    assert (row["class"], row["provenance"], row["reviewed"]) == ("SNE", "auto", False)
    assert not s.undo()
    with pytest.raises(ValueError, match="unknown class"):
        s.set_class([1], "XX")


def test_class_counts_follow_every_step_without_recounting():
    """The counts kept step by step equal a recount after class changes, undo, redo, a split
    and a delete; ``last_changed`` names the rows a row-level step changed."""
    s = make_session()

    def recount():
        return s.table["class"].astype(str).value_counts().sort_index().astype(int)

    assert s.class_counts().equals(recount())
    s.set_class([2, 3], "MO")
    assert s.last_changed == [2, 3] and s.class_counts().equals(recount())
    s.set_class([2], "LY")
    s.undo()
    assert s.last_changed == [2] and s.class_counts().equals(recount())
    s.redo()
    assert s.class_counts().equals(recount()) and s.class_counts()["LY"] == 1
    s.split(2)  # a whole-table step: counted again
    assert s.last_changed is None and s.class_counts().equals(recount())
    s.delete([1])
    assert s.class_counts().equals(recount())


def test_queue_walks_least_certain_first_and_skips_reviewed():
    s = make_session()
    assert s.build_queue(mode="uncertain") == [2, 4, 3, 1]  # margins .05, .1, .5, .85
    assert s.next() == 2 and s.next() == 4 and s.previous() == 2
    s.mark_reviewed([4])
    assert s.build_queue() == [2, 3, 1]
    assert s.build_queue(mode="class:SNE") == [2, 1]
    assert s.progress == (1, 4)


def test_painting_a_new_object_and_erasing_one_syncs_the_table():
    s = make_session()
    s.labels[52:58, 60:70] = 9  # painted with a new id
    s.labels[s.labels == 1] = 0  # erased
    added, removed = s.sync_with_labels()
    assert added == [9] and removed == [1]
    row = s.row(9)
    assert (row["class"], row["provenance"]) == (UNASSIGNED, "manual")
    assert row["y"] == pytest.approx(54.5 + 100) and row["area_px"] == 60
    assert row["bbox_y0"] == 152 and row["bbox_x1"] == 270
    assert 1 not in s.table.index


def test_a_paint_remeasures_only_the_objects_it_touched():
    """Painting over part of object 2 re-measures 2, not the untouched objects (whose rows
    keep the engine's geometry: here deliberately different from their pixels)."""
    s = make_session()
    s.table.loc[3, ["bbox_y0", "bbox_y1"]] = (-7, -5)  # not its pixels' box: must stay
    s.labels[20:30, 60:70] = 4  # the right third of object 2 painted as object 4
    added, removed = s.sync_with_labels()
    assert added == removed == []
    assert s.row(2)["area_px"] == 200 and s.row(2)["bbox_x1"] == 200 + 60
    assert s.row(4)["area_px"] == 200 and s.row(4)["bbox_y0"] == 100 + 20
    assert (s.row(3)["bbox_y0"], s.row(3)["bbox_y1"]) == (-7, -5)
    assert s.row(1)["bbox_y1"] == 0  # untouched: as the table had it


def test_merge_split_delete_keep_labels_and_table_consistent():
    s = make_session()
    s.merge(3, 4)
    assert 4 not in s.table.index and (s.labels == 4).sum() == 0
    assert s.row(3)["area_px"] == 200 and s.row(3)["provenance"] == "corrected"
    new = s.split(2)
    assert new == 5
    a, b = (s.labels == 2).sum(), (s.labels == 5).sum()
    assert a + b == 300 and min(a, b) > 100  # split across the long axis
    assert s.row(5)["class"] == s.row(2)["class"]
    s.delete([1])
    assert 1 not in s.table.index and (s.labels == 1).sum() == 0
    ids = set(np.unique(s.labels)) - {0}
    assert ids == set(s.table.index)


def test_points_add_move_accept_reject_and_counts():
    table = pd.DataFrame({"id": [1, 2, 3], "y": [100.0, 120.0, 5000.0], "x": [100.0, 110.0, 5000.0],
                          "class": ["mitosis"] * 3, "confidence": [0.9, 0.6, 0.7],
                          "prob_mitosis": [0.9, 0.6, 0.7], "provenance": ["auto"] * 3,
                          "reviewed": [False] * 3})
    s = ReviewSession(AnnotationSet("points", table, ["mitosis"], mpp=0.25))
    new = s.add_point(130.0, 90.0, name="mitosis")
    s.move_point(1, 101.0, 99.0)
    s.accept([2])
    s.reject([3])
    t = s.to_annotations().table
    assert t.set_index("id").loc[new, "provenance"] == "manual"
    assert t.set_index("id").loc[1, "provenance"] == "corrected"
    assert t.set_index("id").loc[3, "class"] == REJECTED
    count = mitotic_count(t, area_mm2=2.0)
    assert count["mitoses"] == 3 and count["per_2_mm2"] == 3.0
    spot = hotspot(t, mpp=0.25)
    assert spot["count"] == 3 and spot["id"] in (1, 2, new)


def test_differential_counts_only_white_cells():
    t = pd.DataFrame({"class": ["SNE"] * 60 + ["LY"] * 30 + ["MO"] * 10 + ["RBC"] * 500 + ["Platelets"] * 20,
                      "cell_type": ["WBC"] * 100 + ["RBC"] * 500 + ["Platelets"] * 20})
    d = differential(t)
    assert d["wbc_total"] == 100 and d["target_reached"]
    assert d["percent"]["SNE"] == 60.0 and d["rbc"] == 500 and d["platelets"] == 20


def test_sync_points_follows_add_move_delete():
    table = pd.DataFrame({"id": [1, 2, 3], "y": [10.0, 20.0, 30.0], "x": [10.0, 20.0, 30.0],
                          "class": ["mitosis"] * 3, "confidence": [0.9, 0.8, 0.7],
                          "provenance": ["auto"] * 3, "reviewed": [False] * 3})
    s = ReviewSession(AnnotationSet("points", table, ["mitosis"], mpp=0.25))
    ids = np.array([1, 3, -1])
    yx = np.array([[10.0, 10.0], [31.0, 30.0], [50.0, 60.0]])
    added, removed, moved = s.sync_points(yx, ids)
    assert removed == [2] and moved == [3] and added == [4] and ids[2] == 4
    assert s.row(4)["provenance"] == "manual" and s.row(3)["provenance"] == "corrected"
    assert s.row(3)["y"] == 31.0 and s.row(4)["x"] == 60.0


def test_rates_are_over_the_region_analysed_and_the_hotspot_lies_inside_it(tmp_path):
    """Issue 13 item 1: a region run of a big slide counts over the region, not the slide."""
    pytest.importorskip("onnx")
    from napari_hemato.api import analyze
    from napari_hemato.core.annotations import from_result
    from napari_hemato.tasks import task_for

    from .onnx_models import dark_blob_model_dir
    from .synthetic import disk_image, write_tiff

    model = dark_blob_model_dir(tmp_path / "model", task="mitosis", kind="points",
                                class_names=("mitosis",), outputs={"heatmap": "fg"},
                                postprocess={"threshold": 0.5, "min_distance_um": 3.0})
    slide = write_tiff(tmp_path / "he.tif", disk_image((1200, 1600), n=200, seed=3), mpp=0.5)
    roi = (100, 200, 500, 700)  # 400 x 500 px at 0.5 µm/px = 0.05 mm² of a 0.48 mm² slide
    result = analyze(slide, task="mitosis", model=model, roi=roi, out=tmp_path / "run.zarr",
                     tissue="none")  # dark disks on white are not H&E tissue
    ann = from_result(result)
    assert ann.region == roi and ann.region_mm2 == pytest.approx(0.05)
    assert ann.metadata["region"] == list(roi)
    n = len(ann.table)
    assert n > 0
    task = task_for(ann)
    s = task.summary(ann.table, area_mm2=ann.region_mm2, mpp=ann.mpp, region=ann.region)
    c = s["mitotic_count"]
    assert c["area_mm2"] == pytest.approx(0.05)
    assert c["per_2_mm2"] == pytest.approx(n / 0.05 * 2, rel=1e-3)
    spot = s["hotspot"]
    side_px = spot["side_um"] / 0.5
    assert side_px <= min(roi[2] - roi[0], roi[3] - roi[1]) + 1e-6
    assert roi[0] + side_px / 2 - 1e-6 <= spot["y"] <= roi[2] - side_px / 2 + 1e-6
    assert roi[1] + side_px / 2 - 1e-6 <= spot["x"] <= roi[3] - side_px / 2 + 1e-6
    assert 0 < spot["count"] <= n
    assert "0.05 mm² analysed" in task.summary_lines(s)[0]


def test_a_hotspot_window_centred_near_the_edge_moves_inside_the_region():
    t = pd.DataFrame({"id": [1, 2, 3], "y": [5.0, 8.0, 900.0], "x": [5.0, 9.0, 900.0],
                      "class": ["mitosis"] * 3})
    spot = hotspot(t, mpp=0.5, area_mm2=0.01, region=(0, 0, 1000, 1000))  # side 100 µm = 200 px
    assert spot["count"] == 2 and spot["side_um"] == 100.0
    assert (spot["y"], spot["x"]) == (100.0, 100.0)


def smear_session(n_rbc=80, seed=0) -> ReviewSession:
    """A smear field's table as the smear task writes it: red cells with detector probabilities
    only (NaN subtype probabilities), one white cell with both, one platelet."""
    from napari_hemato.models.cell_classifier import CLASS_NAMES
    from napari_hemato.tasks import get_task

    rng = np.random.default_rng(seed)
    types = ["RBC", "WBC", "Platelets"]
    rows = []
    kinds = ["RBC"] * n_rbc + ["WBC", "Platelets"]
    for i, kind in enumerate(kinds, start=1):
        p = {"RBC": [0.97, 0.02, 0.01], "WBC": [0.02, 0.97, 0.01],
             "Platelets": [0.03, 0.02, 0.95]}[kind]
        p = np.asarray(p) + rng.uniform(-0.01, 0.01, 3)
        row = {"id": i, "y": 10.0 * i, "x": 10.0, "class": kind, "cell_type": kind,
               "confidence": float(p.max()), "provenance": "auto", "reviewed": False,
               "area_px": 50.0, **{f"prob_{c}": float(v) for c, v in zip(types, p, strict=True)},
               **{f"prob_{c}": np.nan for c in CLASS_NAMES}}
        if kind == "WBC":  # a subtype call the classifier is unsure about: review it first
            sub = np.full(len(CLASS_NAMES), 0.02)
            sub[:2] = [0.45, 0.35]
            row.update({f"prob_{c}": float(v) for c, v in zip(CLASS_NAMES, sub, strict=True)})
            row["class"], row["confidence"] = CLASS_NAMES[0], 0.45
        rows.append(row)
    ann = AnnotationSet("instances", pd.DataFrame(rows), types + list(CLASS_NAMES), None,
                        mpp=0.5, metadata={"model": {"task": "smear"}})
    return ReviewSession(ann, hierarchy=get_task("smear").hierarchy(ann))


def test_uncertain_first_ranks_rows_with_nan_subtype_probabilities():
    """Issue 13 item 3: NaN subtype probabilities of red cells used to break the margin sort."""
    s = smear_session()
    queue = s.build_queue(mode="uncertain")
    assert len(queue) == 82 and queue[0] == 81  # the only white cell, first
    margins = s.hierarchy.margins(s.table.loc[queue])
    assert np.all(np.isfinite(margins)) and np.all(np.diff(margins) >= 0)


def test_one_class_hierarchy_moves_cells_between_counts():
    """Issue 13 item 2: a class change moves the cell between types and counts."""
    from napari_hemato.models.cell_classifier import CLASS_NAMES
    from napari_hemato.tasks import get_task

    s = smear_session(n_rbc=5)
    task = get_task("smear")
    h = s.hierarchy
    assert h.types == ("RBC", "WBC", "Platelets") and h.subtypes["WBC"] == CLASS_NAMES
    keys = h.hotkeys()
    assert set(keys.values()) == set(h.classes)  # every class reachable, PMY, ERB, PLT too
    assert {keys["Alt-1"], keys["Alt-Minus"], keys["Control-Alt-1"]} == {"SNE", "PLT", "RBC"}

    def counts():
        d = task.summary(s.table)["differential"]
        return d["rbc"], d["wbc_total"], d["platelets"], d["counts"]["LY"]

    assert counts() == (5, 1, 1, 0)
    s.set_class([1], "LY")  # a red cell given a white-cell subtype: now a counted WBC
    assert s.row(1)["cell_type"] == "WBC" and counts() == (4, 2, 1, 1)
    s.set_class([7], "RBC")  # platelet -> red cell
    assert s.row(7)["cell_type"] == "RBC" and counts() == (5, 2, 0, 1)
    s.set_class([2], "WBC")  # a WBC without subtype yet: a type, not in the differential
    assert (s.row(2)["class"], s.row(2)["cell_type"]) == ("WBC", "WBC")
    assert s.undo() and s.undo() and s.undo() and counts() == (5, 1, 1, 0)
    assert s.redo() == "set class" and counts() == (4, 2, 1, 1)


def test_undo_and_redo_every_action_labels_included():
    """Issue 13 item 4: undo and redo for every action, pixels and table."""
    s = make_session()
    labels0, table0 = s.labels.copy(), s.table.copy()
    s.set_class([2], "MO")
    s.mark_reviewed([2])
    assert s.undo() == "reviewed" and s.undo() == "set class"
    assert s.row(2)["class"] == "SNE" and not s.row(2)["reviewed"]  # the original class
    assert s.redo() == "set class" and s.row(2)["class"] == "MO"
    assert s.undo()
    s.merge(3, 4)
    new = s.split(2)
    s.delete([1])
    s.labels[52:56, 70:75] = 9  # painted
    s.sync_with_labels()
    after_table, after_labels = s.table.copy(), s.labels.copy()
    assert [s.undo() for _ in range(4)] == ["paint", "delete", "split", "merge"]
    np.testing.assert_array_equal(s.labels, labels0)
    pd.testing.assert_frame_equal(s.table, table0)
    assert s.undo() is None
    assert [s.redo() for _ in range(4)] == ["merge", "split", "delete", "paint"]
    np.testing.assert_array_equal(s.labels, after_labels)
    pd.testing.assert_frame_equal(s.table, after_table)
    assert new in s.table.index and 9 in s.table.index and s.redo() is None
    s.undo()
    s.set_class([3], "LY")  # a new action clears what could be redone
    assert s.redo() is None


def test_points_accept_reject_undo_redo():
    s = make_points()
    s.accept([1])
    s.reject([2])
    s.sync_points(s.table[["y", "x"]].to_numpy(float)[1:], s.table["id"].to_numpy()[1:].copy())
    assert 1 not in s.table.index
    assert s.undo() == "edit points" and 1 in s.table.index and s.row(1)["reviewed"]
    assert s.undo() == "reject" and s.row(2)["class"] == "mitosis"
    assert s.undo() == "accept" and not s.row(1)["reviewed"]
    assert s.redo() == "accept" and s.redo() == "reject" and s.row(2)["class"] == REJECTED


def make_points() -> ReviewSession:
    table = pd.DataFrame({"id": [1, 2, 3], "y": [10.0, 20.0, 30.0], "x": [10.0, 20.0, 30.0],
                          "class": ["mitosis"] * 3, "confidence": [0.9, 0.8, 0.7],
                          "provenance": ["auto"] * 3, "reviewed": [False] * 3})
    return ReviewSession(AnnotationSet("points", table, ["mitosis"], mpp=0.25))


def test_points_added_to_a_run_that_found_none_have_numeric_blanks():
    """Found in the day-of-review test: an empty table has object columns; a hand-added
    point must still get NaN (not "") confidence and probabilities."""
    cols = ["id", "y", "x", "class", "confidence", "prob_normal", "provenance", "reviewed"]
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    s = ReviewSession(AnnotationSet("points", empty, ["normal"], mpp=0.25))
    new = s.add_point(10.0, 20.0)
    assert np.isnan(float(s.row(new)["confidence"])) and np.isnan(s.probabilities(new)["normal"])
    assert s.row(new)["class"] == UNASSIGNED
