"""A scripted day of review (issue 13, deliverable 5), in real viewers with the shipped models.

A hematologist reviews the bundled smear field (a JPEG without pixel size) and a
pathologist a region of the bundled H&E slide (an SVS pyramid): many corrections across
classes and cell types, with hotkeys, undo and redo, layer switches, two exports, then
closing and reopening every image. Each count and rate the panel shows is checked
against the test's own bookkeeping and an independent recount from the exported tables.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from napari_hemato.models.cell_classifier import CLASS_NAMES
from napari_hemato.samples import sample_path

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def run(qtbot, analyze):
    analyze.start()
    assert analyze.worker is not None
    with qtbot.waitSignal(analyze.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: analyze.worker is None, timeout=60_000)


def cell_type(name: str) -> str:
    """The test's own hierarchy: a white-cell subtype is a WBC, a type is itself."""
    return "WBC" if name in CLASS_NAMES else name


class Book:
    """What the reviewer did, kept by the test (class and cell type per id), with undo/redo."""

    def __init__(self, table):
        self.now = table.set_index("id")[["class", "cell_type"]].copy()
        self.undo_stack, self.redo_stack = [], []

    def _push(self):
        self.undo_stack.append(self.now.copy())
        self.redo_stack.clear()

    def set(self, obj_id, name):
        self._push()
        self.now.loc[obj_id] = [name, cell_type(name)]

    def touch(self):  # an action that changes no class (reviewed, accept)
        self._push()

    def drop(self, obj_id):
        self._push()
        self.now = self.now.drop(index=obj_id)

    def undo(self):
        self.redo_stack.append(self.now)
        self.now = self.undo_stack.pop()

    def redo(self):
        self.undo_stack.append(self.now)
        self.now = self.redo_stack.pop()

    def counts(self):
        t = self.now
        wbc = t[(t["cell_type"] == "WBC") & t["class"].isin(CLASS_NAMES)]
        return {"rbc": int((t["cell_type"] == "RBC").sum()),
                "platelets": int((t["cell_type"] == "Platelets").sum()),
                "wbc": int(len(wbc)), "subtypes": wbc["class"].value_counts().to_dict()}


def panel_counts(text: str) -> dict:
    rbc, platelets = map(int, re.search(r"RBC (\d+), platelets (\d+)", text).groups())
    wbc = int(re.search(r"WBC differential: (\d+) cells", text).group(1))
    subtypes = {k: int(n) for k, n in re.findall(r"(?:^|<br>)\s*([A-Z]+)\s+(\d+)\s+[\d.]+ %", text)}
    return {"rbc": rbc, "platelets": platelets, "wbc": wbc, "subtypes": subtypes}


def recount(table: pd.DataFrame) -> dict:
    """Counts straight from an exported table (no package code)."""
    ct, cls = table["cell_type"].astype(str), table["class"].astype(str)
    wbc = cls[(ct == "WBC") & cls.isin(CLASS_NAMES)]
    return {"rbc": int((ct == "RBC").sum()), "platelets": int((ct == "Platelets").sum()),
            "wbc": int(len(wbc)), "subtypes": wbc.value_counts().to_dict()}


def press(review, viewer, name):
    """The hotkey of class ``name`` (every class has one)."""
    key = next(k for k, v in review.hotkeys.items() if v == name)
    review._class_key(key)(viewer)


def test_a_day_of_review(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.export import ExportWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.tasks.mitosis import HPF_MM2

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    jpeg = shutil.copy(sample_path("smear_field"), tmp_path / "smear field.jpg")
    svs = shutil.copy(sample_path("he_slide"), tmp_path / "he.svs")
    out = tmp_path / "exports"
    out.mkdir()

    # -- morning: the smear field -------------------------------------------------------
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(jpeg, plugin="napari-hemato")
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    assert analyze.task.value == "smear"  # offered from the image
    run(qtbot, analyze)
    cells = viewer.layers[-1]
    assert cells.metadata["napari_hemato"]["role"] == "instances"
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    viewer.layers.selection.active = cells
    session = review.session
    book = Book(session.table)
    assert panel_counts(review.summary.text()) == book.counts()
    wbcs = [i for i, t in book.now["cell_type"].items() if t == "WBC"]
    queue = session.build_queue()  # ranked on real margins, not id order (was 80th of 81)
    assert wbcs and queue.index(wbcs[0]) < 10

    rng = np.random.default_rng(13)
    targets = [*CLASS_NAMES, "RBC", "Platelets", "WBC"]
    n_done = 0
    for step in range(36):
        ids = list(book.now.index)
        obj = int(rng.choice(ids))
        review.select(obj, zoom=step % 5 == 0)
        if step % 9 == 4:  # a layer switch in the middle of the work
            viewer.layers.selection.active = image
            viewer.layers.selection.active = cells
            assert review.session is session
            review.select(obj)
        name = targets[step % len(targets)]
        press(review, viewer, name)
        book.set(obj, name)
        n_done += 1
        if step % 4 == 1:
            review.mark_reviewed()
            book.touch()
        if step % 7 == 3:
            assert review.undo() and review.undo()
            book.undo()
            book.undo()
            assert review.redo()
            book.redo()
        assert panel_counts(review.summary.text()) == book.counts(), step
    # structural edits: merge two red cells, delete a platelet, both undone and redone
    rbcs = [i for i, t in book.now["cell_type"].items() if t == "RBC"]
    review.select(rbcs[0])
    review.merge_with.setValue(rbcs[1])
    review.merge()
    book.drop(rbcs[1])
    review.select(rbcs[2])
    review.delete()
    book.drop(rbcs[2])
    assert review.undo() == "delete" and review.undo() == "merge"
    book.undo()
    book.undo()
    assert panel_counts(review.summary.text()) == book.counts()
    assert review.redo() == "merge"
    book.redo()
    assert panel_counts(review.summary.text()) == book.counts()
    n_done += 1
    final_smear = book.counts()
    review.autosave()

    exporter = ExportWidget(viewer)
    exporter.folder.value = out
    exporter.layer.value = cells
    for name, box in exporter.checks.items():
        box.value = name in ("crops", "geojson")
    written = exporter.export()
    assert all(" " not in p.name for p in written.values())
    manifest = pd.read_csv(written["crops"] / "manifest.csv")
    assert recount(manifest) == final_smear
    assert exporter.export() == {}  # the second export asks for the checkbox ...
    assert "overwrite existing files" in exporter.status.value
    exporter.overwrite.value = True
    assert set(exporter.export()) == {"crops", "geojson"}  # ... and then replaces
    assert recount(pd.read_csv(written["crops"] / "manifest.csv")) == final_smear
    viewer.close()

    # -- afternoon: an H&E region, mitoses -------------------------------------------------
    viewer = make_napari_viewer(show=True)
    [he] = viewer.open(svs, plugin="napari-hemato")
    mpp = float(he.metadata["napari_hemato"]["mpp"])
    analyze = AnalyzeWidget(viewer)
    shapes = viewer.add_shapes([[[100 * mpp, 200 * mpp], [700 * mpp, 1000 * mpp]]],
                               shape_type="rectangle", name="region")
    analyze.image.value = he
    analyze.task.value, analyze.region.value, analyze.shapes.value = "mitosis", "drawn shapes", shapes
    run(qtbot, analyze)
    points = viewer.layers[-1]
    assert points._type_string == "points"
    region = points.metadata["napari_hemato"]["region"]
    area = (region[2] - region[0]) * (region[3] - region[1]) * mpp**2 / 1e6
    assert area < 0.2  # the region, not the 26 mm² slide
    review = ReviewWidget(viewer)
    viewer.layers.selection.active = points
    n0 = len(points.data)
    rng = np.random.default_rng(7)
    y0, x0, y1, x1 = region
    added = rng.uniform([y0 + 20, x0 + 20], [y1 - 20, x1 - 20], size=(8, 2))
    for yx in added:  # mitoses the model missed, added with napari's points tools
        points.add(yx - np.asarray(points.metadata["napari_hemato"]["origin"]))
    ids = list(review.session.table["id"])
    assert len(ids) == n0 + 8
    for obj in ids[:3]:
        review.select(obj)
        press(review, viewer, "atypical")
        n_done += 1
    review.select(ids[3])
    review.reject()
    n_done += 1
    review.select(ids[4])
    review.accept()
    viewer.layers.selection.active = he  # a layer switch, then back: the history holds
    viewer.layers.selection.active = points
    assert review.undo() == "accept" and review.undo() == "reject"
    assert review.redo() == "reject"
    table = review.session.table
    mitoses = int((~table["class"].isin(["rejected", "unassigned"])).sum())
    assert mitoses == n0 + 8 - 1 - (table["class"] == "unassigned").sum()
    text = review.summary.text()
    count = re.search(r"(\d+) mitoses in ([\d.]+) mm² analysed: ([\d.]+) / 10 HPF", text)
    assert count is not None, text
    n, shown_area, per10 = int(count[1]), float(count[2]), float(count[3])
    assert shown_area == pytest.approx(area, rel=1e-3)
    spot = review._summary["hotspot"]
    side = spot["side_um"] / mpp
    assert side <= min(y1 - y0, x1 - x0) + 1e-6
    assert y0 <= spot["y"] - side / 2 + 1e-6 and spot["y"] + side / 2 <= y1 + 1e-6
    review.autosave()
    exporter = ExportWidget(viewer)
    exporter.folder.value = out
    exporter.layer.value = points
    for name, box in exporter.checks.items():
        box.value = name == "points_csv"
    written = exporter.export()
    exported = pd.read_csv(written["points_csv"], comment="#")
    recounted = int((~exported["class"].astype(str).isin(["rejected", "unassigned"])).sum())
    assert recounted == n
    assert per10 == pytest.approx(round(recounted / area * 10 * HPF_MM2, 2), abs=0.011)
    saved_points = review.session.table.set_index("id")[["class"]].copy()
    viewer.close()

    # -- next morning: reopen both images; the corrections are there, where they were made ----
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(jpeg, plugin="napari-hemato")
    assert [lyr._type_string for lyr in layers] == ["image", "labels"]
    back = layers[1].features.set_index("id")
    assert recount(back.reset_index()) == final_smear
    assert tuple(layers[1].scale) == pytest.approx(tuple(layers[0].scale))  # the image's pixels
    viewer.close()
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(svs, plugin="napari-hemato")
    restored = [lyr for lyr in layers if lyr._type_string == "points"]
    assert len(restored) == 1
    pd.testing.assert_series_equal(restored[0].features.set_index("id")["class"],
                                   saved_points["class"], check_names=False)
    assert n_done >= 40
