"""The Review dock in a real viewer, as a plugin sees it (through napari's proxies):
sessions keyed on the layer's identity, undo/redo per layer, every class on a hotkey,
Next/Prev framing the object."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.io.layers import annotation_layer_data
from napari_hemato.models.cell_classifier import CLASS_NAMES

pytestmark = pytest.mark.gui
TYPES = ["RBC", "WBC", "Platelets"]


def smear_annotations(n_rbc=12, *, mpp=0.5) -> AnnotationSet:
    """A small smear field with labels: red cells, one white cell, one platelet."""
    labels = np.zeros((200, 240), np.uint32)
    kinds = ["RBC"] * n_rbc + ["WBC", "Platelets"]
    rows = []
    for i, kind in enumerate(kinds, start=1):
        y0, x0 = 10 + 40 * ((i - 1) // 6), 10 + 38 * ((i - 1) % 6)
        labels[y0:y0 + 20, x0:x0 + 20] = i
        p = {"RBC": [0.9, 0.06, 0.04], "WBC": [0.05, 0.9, 0.05], "Platelets": [0.1, 0.1, 0.8]}[kind]
        row = {"id": i, "y": y0 + 9.5, "x": x0 + 9.5, "bbox_y0": y0, "bbox_x0": x0,
               "bbox_y1": y0 + 20, "bbox_x1": x0 + 20, "area_px": 400.0, "class": kind,
               "cell_type": kind, "confidence": max(p), "provenance": "auto", "reviewed": False,
               **{f"prob_{c}": v for c, v in zip(TYPES, p, strict=True)},
               **{f"prob_{c}": np.nan for c in CLASS_NAMES}}
        if kind == "WBC":
            row.update({f"prob_{c}": 0.5 if c == "SNE" else 0.05 for c in CLASS_NAMES})
            row["class"], row["confidence"] = "SNE", 0.5
        rows.append(row)
    return AnnotationSet("instances", pd.DataFrame(rows), TYPES + list(CLASS_NAMES), labels,
                         mpp=mpp, image_shape=labels.shape, metadata={"model": {"task": "smear"}})


def add_layer(viewer, ann, name):
    data, kwargs, _ = annotation_layer_data(ann, name=name)
    return viewer.add_labels(data, **kwargs)


def feats(layer):
    return layer.features.set_index("id")


def test_review_through_proxies_undo_redo_queue_and_hotkeys(make_napari_viewer_proxy, qtbot,
                                                            tmp_path):
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.core.export import export_crops, import_crops

    from .synthetic import write_tiff

    viewer = make_napari_viewer_proxy()
    ann = smear_annotations()
    ann.image_path = str(write_tiff(tmp_path / "field.tif", np.full((200, 240, 3), 200, np.uint8)))
    a = add_layer(viewer, ann, "field A")
    b = add_layer(viewer, smear_annotations(n_rbc=6), "field B")
    review = ReviewWidget(viewer)
    viewer.layers.selection.active = viewer.layers["field A"]
    assert review.layer.name == "field A"

    # every class of the hierarchy is on a hotkey; the class list shows the levels
    assert set(review.hotkeys.values()) == set(TYPES) | set(CLASS_NAMES)
    labels_shown = [review.class_box.itemText(k) for k in range(review.class_box.count())]
    assert "WBC › PMY" in labels_shown and "RBC" in labels_shown

    first = review.session.build_queue()[0]
    assert first == 13  # the white cell (the least certain subtype call) comes first
    review.next()
    second = review.session.next()
    review.session.previous()
    assert review.selected == first
    review.select(1, zoom=True)
    rbc = 1
    review._class_key(next(k for k, v in review.hotkeys.items() if v == "LY"))(viewer)
    review.mark_reviewed()  # Alt-R
    assert (feats(a).loc[rbc, "class"], feats(a).loc[rbc, "cell_type"]) == ("LY", "WBC")

    # switch layers and back (new proxies every time): the session, undo and queue survive
    viewer.layers.selection.active = viewer.layers["field B"]
    assert review.layer.name == "field B"
    review.session.set_class([1], "EO")
    viewer.layers.selection.active = viewer.layers["field A"]
    assert review.layer.name == "field A" and len(review.sessions) == 2
    review.selected = rbc
    assert review.undo() == "reviewed" and review.undo() == "set class"
    assert (feats(a).loc[rbc, "class"], feats(a).loc[rbc, "cell_type"]) == ("RBC", "RBC")
    assert review.undo() is None  # nothing else was done on this layer
    assert review.redo() == "set class" and feats(a).loc[rbc, "class"] == "LY"
    assert feats(b).loc[1, "class"] == "RBC"  # the widget never touched B's layer features
    review.next()
    assert review.selected == second  # the queue position was kept

    # a platelet made a red cell moves between the counts in the summary
    review.select(14)
    review._class_key(next(k for k, v in review.hotkeys.items() if v == "RBC"))(viewer)
    assert "RBC 12, platelets 0" in review.summary.text()
    # the crops manifest exports the same class and cell type the counts use
    manifest = import_crops(export_crops(review.session.to_annotations(), tmp_path / "crops")).table
    m = manifest.set_index("id")
    assert (m.loc[rbc, "class"], m.loc[rbc, "cell_type"]) == ("LY", "WBC")
    assert (m.loc[14, "class"], m.loc[14, "cell_type"]) == ("RBC", "RBC")

    # merge and delete undo with their pixels
    before = np.array(a.data)
    review.select(2)
    review.merge_with.setValue(3)
    review.merge()
    review.select(4)
    review.delete()
    assert (np.asarray(a.data) == 3).sum() == 0 and 4 not in feats(a).index
    assert review.undo() == "delete" and review.undo() == "merge"
    np.testing.assert_array_equal(np.asarray(a.data), before)
    assert {2, 3, 4} <= set(feats(a).index)


def test_next_zooms_to_a_review_scale_and_frames_the_object(make_napari_viewer, qtbot):
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.io.viewer import level0_to_world

    viewer = make_napari_viewer(show=True)
    image = np.full((2000, 2400, 3), 230, np.uint8)
    viewer.add_image(image, scale=(0.5, 0.5), name="field")
    ann = smear_annotations()
    layer = add_layer(viewer, ann, "field smear")
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    viewer.reset_view()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    zoom0 = camera.zoom
    review.next()
    row = review.session.row(review.selected)
    assert camera.zoom > 2 * zoom0
    np.testing.assert_allclose(camera.center[-2:],
                               level0_to_world(layer, row["y"], row["x"]), atol=1e-6)
    boxes = [lyr for lyr in viewer.layers if lyr.name == "review: selected"]
    assert len(boxes) == 1 and viewer.layers.selection.active is layer
    (y0, x0), (y1, x1) = boxes[0].data[0].min(0), boxes[0].data[0].max(0)
    cy, cx = level0_to_world(layer, row["y"], row["x"])
    assert y0 < cy < y1 and x0 < cx < x1
    review.next()
    assert len([lyr for lyr in viewer.layers if lyr.name == "review: selected"]) == 1
    assert layer.selected_label == review.selected


def test_task_offered_from_the_image(make_napari_viewer, qtbot):
    """Issue 13 item 8: a smear camera field is offered the smear task, a slide nuclei."""
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato.samples import sample_path

    viewer = make_napari_viewer()
    widget = AnalyzeWidget(viewer)
    [smear, *_] = viewer.open(sample_path("smear_field"), plugin="napari-hemato")
    widget.image.value = smear
    assert widget.task.value == "smear"
    [slide, *_] = viewer.open(sample_path("he_slide"), plugin="napari-hemato")
    widget.image.value = slide
    assert widget.task.value == "nuclei"


def test_export_twice_names_without_spaces_and_gui_wording(make_napari_viewer, qtbot, tmp_path,
                                                           monkeypatch):
    """Issue 13 item 8: a second export says what to tick, in a short notification."""
    import napari_hemato._widgets.export as export_module
    from napari_hemato._widgets.export import ExportWidget

    errors = []
    monkeypatch.setattr(export_module, "show_error", errors.append)
    viewer = make_napari_viewer()
    layer = add_layer(viewer, smear_annotations(), "field A smear")
    exporter = ExportWidget(viewer)
    exporter.folder.value = tmp_path
    exporter.layer.value = layer
    for name, box in exporter.checks.items():
        box.value = name == "geojson"
    written = exporter.export()
    assert [p.name for p in written.values()] == ["field_A_smear.geojson"]
    assert exporter.export() == {}
    assert "overwrite=True" not in exporter.status.value
    assert "Tick 'overwrite existing files'" in exporter.status.value
    assert len(errors) == 1 and len(errors[0]) < 120 and errors[0].endswith(")")
    exporter.overwrite.value = True
    assert exporter.export() == written


def test_demo_view_opens_the_result_in_napari(qtbot, tmp_path):
    """Issue 13 item 10: `napari-hemato demo --view` opens the slide, its result and Review."""
    pytest.importorskip("onnx")
    from napari_hemato.api import analyze
    from napari_hemato.cli.analyze import view_result

    from .onnx_models import dark_blob_model_dir
    from .synthetic import disk_image, write_tiff

    field = write_tiff(tmp_path / "field.tif", disk_image((200, 260), n=12, seed=2), mpp=0.5)
    model = dark_blob_model_dir(tmp_path / "model")
    result = analyze(field, task="nuclei", model=model, out=tmp_path / "run.zarr")
    viewer = view_result(field, result, run=False)
    try:
        assert [lyr._type_string for lyr in viewer.layers] == ["image", "labels"]
        assert viewer.layers[1].scale[0] == pytest.approx(0.5)
        assert any("Review" in name for name in viewer.window.dock_widgets)
    finally:
        viewer.close()


def test_feedback_phases_no_stale_bar_and_docks_that_fit(make_napari_viewer, qtbot, tmp_path):
    """Issue 13 item 7: a phase instead of 0 % before the first tile, no stale 100 % bar,
    status lines that wrap, a Review dock that fits a 1000 px screen."""
    pytest.importorskip("onnx")
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.api import Phase

    from .onnx_models import dark_blob_model_dir
    from .synthetic import disk_image, write_tiff

    field = write_tiff(tmp_path / "field.tif", disk_image((200, 260), n=12, seed=2), mpp=0.5)
    model = dark_blob_model_dir(tmp_path / "model")
    viewer = make_napari_viewer(show=True)
    viewer.open(field, plugin="napari-hemato")
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    phases, on_progress = [], analyze._on_progress

    def spy(item):
        if isinstance(item[3], Phase):
            phases.append((item[3].name, analyze.progress.max))
        on_progress(item)
        if isinstance(item[3], Phase):
            assert analyze.status.value.endswith(f"{item[3].name}…")

    analyze._on_progress = spy  # connected by start()
    analyze.task.value, analyze.model.value = "nuclei", str(model)
    for _ in range(2):
        analyze.start()
        assert analyze.progress.max == 0 and analyze.progress.value == 0  # busy, not last 100 %
        with qtbot.waitSignal(analyze.worker.finished, timeout=300_000):
            pass
        qtbot.waitUntil(lambda: analyze.worker is None, timeout=60_000)
    assert ("loading the model", 0) in phases
    width = analyze.native.sizeHint().width()
    analyze.status.value = "a very long status line " * 20
    assert analyze.native.sizeHint().width() <= width + 5
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    assert review.minimumSizeHint().height() < 300
    review.summary.setText("a very long summary line " * 20)
    assert review.sizeHint().width() < 600


def test_points_added_moved_and_deleted_undo_and_redo_in_the_layer(make_napari_viewer, qtbot):
    from napari_hemato._widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    table = pd.DataFrame({"id": [1, 2], "y": [10.0, 50.0], "x": [10.0, 60.0],
                          "class": ["normal", "normal"], "confidence": [0.9, 0.6],
                          "prob_normal": [0.9, 0.6], "prob_atypical": [0.1, 0.4],
                          "provenance": ["auto"] * 2, "reviewed": [False] * 2})
    ann = AnnotationSet("points", table, ["normal", "atypical"], mpp=0.25, image_shape=(100, 100),
                        metadata={"model": {"task": "mitosis"}})
    data, kwargs, _ = annotation_layer_data(ann, name="mitoses")
    points = viewer.add_points(data, **kwargs)
    review = ReviewWidget(viewer)
    assert set(review.hotkeys.values()) == {"normal", "atypical", "rejected"}
    points.add([[80.0, 80.0]])
    assert len(points.data) == 3 and len(review.session.table) == 3
    assert review.undo() == "edit points"
    assert len(points.data) == 2 and len(points.features) == 2
    assert review.redo() == "edit points"
    assert len(points.data) == 3 and points.features["provenance"].iloc[-1] == "manual"
    review.select(1)
    review.delete()
    assert len(points.data) == 2
    assert review.undo() == "edit points" and 1 in set(points.features["id"])
    np.testing.assert_allclose(np.asarray(points.data)[list(points.features["id"]).index(1)],
                               [10.0, 10.0])
