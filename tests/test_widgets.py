"""Real napari viewers under Xvfb: analyse -> review -> autosave -> reopen; cancel/resume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .onnx_models import dark_blob_model_dir
from .synthetic import disk_image, write_tiff

pytest.importorskip("onnx")
pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def read_every_tile(monkeypatch):
    """These fields are dark disks on white, not H&E tissue: the widget's H&E runs read every
    tile (its "task default" choice), as before tissue detection."""
    from napari_hemato.tasks import get_task

    for name in ("nuclei", "mitosis"):
        monkeypatch.setattr(get_task(name), "tissue_default", "none")


@pytest.fixture
def field(tmp_path):
    return write_tiff(tmp_path / "field.tif", disk_image((400, 520), n=40, seed=1), mpp=0.5)


@pytest.fixture(scope="module")
def two_class_model(tmp_path_factory):
    return dark_blob_model_dir(tmp_path_factory.mktemp("m") / "model", class_names=("A", "B"),
                               outputs={"foreground": "fg", "class_probs": "probs"})


@pytest.fixture(scope="module")
def points_model(tmp_path_factory):
    return dark_blob_model_dir(tmp_path_factory.mktemp("p") / "model", task="mitosis", kind="points",
                               class_names=("mitosis",), outputs={"heatmap": "fg"},
                               postprocess={"threshold": 0.5, "min_distance_um": 3.0})


def run_analysis(qtbot, widget, *, task, model, timeout=300_000):
    widget.task.value = task
    widget.model.value = str(model)
    widget.start()
    assert widget.worker is not None
    with qtbot.waitSignal(widget.worker.finished, timeout=timeout):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)


def test_analyse_review_autosave_reopen(make_napari_viewer, qtbot, field, two_class_model, points_model):
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(field, plugin="napari-hemato")
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    assert analyze.mpp.value == pytest.approx(0.5)
    run_analysis(qtbot, analyze, task="nuclei", model=two_class_model)
    labels = viewer.layers[-1]
    assert labels._type_string == "labels" and len(labels.features) == 40
    assert labels.scale[0] == pytest.approx(0.5)
    assert {"index", "id", "class", "prob_A", "prob_B", "provenance", "reviewed"} <= set(labels.features)

    run_analysis(qtbot, analyze, task="mitosis", model=points_model)
    points = viewer.layers[-1]
    assert points._type_string == "points" and len(points.data) == 40

    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    session = review.bind_layer(labels)
    first, second, third = session.build_queue()[:3]
    review.select(first)
    review.set_class("B")
    review.select(second)
    review.set_class("B")
    review.select(third)
    review.delete()
    assert (labels.data == third).sum() == 0
    feats = labels.features.set_index("id")
    assert feats.loc[first, "class"] == "B" and feats.loc[first, "provenance"] == "corrected"
    assert third not in feats.index and len(feats) == 39
    assert review.undo() == "delete" and (labels.data == third).sum() > 0  # pixels back too
    assert review.undo() == "set class"
    assert labels.features.set_index("id").loc[second, "class"] == "A"
    assert review.redo() == "set class" and review.redo() == "delete"
    assert (labels.data == third).sum() == 0
    review.select(second)
    review.set_class("B")

    review.bind_layer(points)
    points.add([[10.0, 10.0]])
    pfeats = points.features
    assert len(pfeats) == 41 and pfeats["provenance"].iloc[-1] == "manual"
    assert pfeats["id"].iloc[-1] > 0

    artifacts = Path(os.environ.get("HEMATO_ARTIFACTS", field.parent))
    artifacts.mkdir(parents=True, exist_ok=True)
    viewer.layers.selection.active = labels  # the review panel follows the active layer
    assert review.layer is labels
    review.select(first)
    assert review.bars.values()["B"] == pytest.approx(feats.loc[first, "prob_B"], abs=1e-3)
    review.grab().save(str(artifacts / "review_widget_synthetic.png"))
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.shape[-1] == 4 and shot[..., :3].std() > 5  # something was drawn

    # export every format from the widget, then read each back
    from napari_hemato._widgets.export import ExportWidget
    from napari_hemato.core import export as ex

    exporter = ExportWidget(viewer)
    exporter.folder.value = field.parent / "exports"
    (field.parent / "exports").mkdir()
    exporter.layer.value = labels
    for box in exporter.checks.values():
        box.value = True
    written = exporter.export()
    assert set(written) == {"crops", "tiff", "omezarr", "coco", "geojson"}
    readers = {"tiff": ex.import_tiff, "omezarr": ex.import_omezarr, "coco": ex.import_coco,
               "geojson": ex.import_geojson}
    for fmt, read in readers.items():
        back = read(written[fmt])
        bt = back.table.set_index("id")
        assert bt.loc[first, "class"] == "B" and third not in bt.index, fmt
        assert bt.loc[first, "prob_A"] == pytest.approx(feats.loc[first, "prob_A"]), fmt
        np.testing.assert_array_equal(back.labels, labels.data, err_msg=fmt)
    manifest = ex.import_crops(written["crops"]).table
    assert len(manifest) == 39 and (manifest["class"] == "B").sum() >= 2
    exporter.layer.value = points
    for box in exporter.checks.values():
        box.value = box.enabled
    pw = exporter.export()
    assert set(pw) == {"crops", "omezarr", "geojson", "points_csv"}
    back = ex.import_points_csv(pw["points_csv"]).table
    assert len(back) == 41 and (back["provenance"] == "manual").sum() == 1
    assert exporter.export() == {}  # existing files without overwrite: refused, nothing written

    saved = review.autosave()
    assert saved is not None
    viewer.layers.clear()
    reopened = viewer.open(field, plugin="napari-hemato")
    kinds = sorted(layer._type_string for layer in reopened)
    assert kinds == ["image", "labels", "points"]
    restored = next(layer for layer in reopened if layer._type_string == "labels")
    rf = restored.features.set_index("id")
    assert rf.loc[first, "class"] == "B" and rf.loc[second, "class"] == "B" and third not in rf.index
    assert (restored.data == third).sum() == 0
    restored_points = next(layer for layer in reopened if layer._type_string == "points")
    assert len(restored_points.data) == 41


def test_cancel_then_resume(make_napari_viewer, qtbot, tmp_path, two_class_model):
    from napari_hemato._widgets.analyze import AnalyzeWidget

    big = write_tiff(tmp_path / "big.tif", disk_image((1500, 1500), n=300, seed=4), mpp=0.5)
    viewer = make_napari_viewer(show=True)
    viewer.open(big, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    widget.task.value = "nuclei"
    widget.model.value = str(two_class_model)
    widget.tile.value = 64
    widget.start()
    # cancel from the 8th tile's progress signal: no dependence on how fast the machine is
    widget.worker.yielded.connect(lambda item: getattr(item[3], "done", 0) >= 8 and widget.cancel())
    # (how soon a cancel takes effect is a speed property: benchmarks, not this test)
    with qtbot.waitSignal(widget.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.resume_button.enabled
    [result] = widget.results
    assert result.status == "cancelled" and 0 < result.n_done < len(result.plan)
    kept = set(result.store.done_tiles())
    widget.start(resume=True)
    with qtbot.waitSignal(widget.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    [done] = widget.results
    assert done.status == "complete" and done.path == result.path
    assert kept <= set(done.store.done_tiles())
    assert len(viewer.layers[-1].features) == 300
    assert np.unique(viewer.layers[-1].data).size == 301


def test_large_results_stay_lazy_and_class_review_works(make_napari_viewer, qtbot, field,
                                                        two_class_model, monkeypatch):
    """Above the editable size the labels stay zarr-backed; classes are still corrected."""
    import zarr

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.io import viewer as glue

    monkeypatch.setattr(glue, "MAX_EDITABLE_PIXELS", 1000)
    viewer = make_napari_viewer(show=True)
    viewer.open(field, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    run_analysis(qtbot, widget, task="nuclei", model=two_class_model)
    labels = viewer.layers[-1]
    assert isinstance(labels.data, zarr.Array) and not labels.editable
    assert len(labels.features) == 40
    review = ReviewWidget(viewer)
    session = review.bind_layer(labels)
    assert session.labels is None
    obj = int(labels.features["id"].iloc[0])
    review.select(obj)
    review.set_class("B")
    assert labels.features.set_index("id").loc[obj, "class"] == "B"
    assert not review.split_button.isEnabled()
    # the correction is autosaved (table only) and comes back over the run's lazy labels
    assert review.autosave() is not None
    [(data, kwargs, kind)] = glue.restore_saved_layers(field)
    assert kind == "labels" and isinstance(data, zarr.Array)
    assert kwargs["features"].set_index("id").loc[obj, "class"] == "B"


def test_current_view_region(make_napari_viewer, qtbot, field):
    from napari_hemato.io.viewer import view_roi

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(field, plugin="napari-hemato")
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (100 * 0.5, 150 * 0.5)
    camera.zoom = 8.0 / 0.5  # 8 screen px per image px
    # the layer's corner pixels follow the camera at the next draw: wait for that, not a delay
    qtbot.waitUntil(lambda: (r := view_roi(image)) is not None
                    and (r[2] - r[0]) * (r[3] - r[1]) < 400 * 520 / 4, timeout=60_000)
    roi = view_roi(image)
    y0, x0, y1, x1 = roi
    assert y0 <= 100 <= y1 and x0 <= 150 <= x1
    assert (y1 - y0) * (x1 - x0) < 400 * 520 / 4  # zoomed in: much less than the image


def test_current_view_is_the_visible_part_only(make_napari_viewer, qtbot, field):
    """Issue 13 item 6: the box is what the canvas shows, clipped to the image."""
    from napari_hemato.io.viewer import view_roi

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(field, plugin="napari-hemato")  # 400 x 520 px at 0.5 µm/px
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    canvas = viewer.canvas.size
    camera.zoom = 4.0 / 0.5  # 4 screen px per image px
    camera.center = (0.0, 520 * 0.5)  # the top-right corner: three quarters off the image
    roi = view_roi(image, viewer)
    y0, x0, y1, x1 = roi
    assert (y0, x1) == (0, 520)  # clipped to the image
    on_screen = (canvas[0] / 4.0) * (canvas[1] / 4.0)
    assert (y1 - y0) * (x1 - x0) <= on_screen / 4 + canvas[0] / 4 + canvas[1] / 4 + 1
    assert y1 == pytest.approx(canvas[0] / 8, abs=1) and x0 == pytest.approx(520 - canvas[1] / 8, abs=1)
    camera.center = (-1000.0, -1000.0)
    assert view_roi(image, viewer) is None  # nothing of the image on screen


def test_the_status_says_how_the_pixel_size_was_chosen():
    from types import SimpleNamespace as NS

    from napari_hemato._widgets.analyze import _pixel_size_note

    def run(source, assumed, mpp0):
        return [NS(grid=NS(mpp0=mpp0, mpp_assumed=assumed), spec=NS(assumed_input_mpp=0.08),
                   store=NS(config={"slide": {"mpp_source": source}}))]

    assert _pixel_size_note(run("red-cells", False, 0.0712)) == \
        " (pixel size 0.0712 µm/px, measured on the red cells)"
    assert _pixel_size_note(run("red-cells", False, 0.08)) == \
        " (pixel size 0.08 µm/px, the training images', confirmed by the red cells)"
    assert _pixel_size_note(run("none", True, 0.08)) == " (pixel size unknown: 0.08 µm/px assumed)"
    assert _pixel_size_note(run("svs", False, 0.499)) == ""


def test_live_preview_never_reads_the_store_being_written(make_napari_viewer, qtbot, field,
                                                          two_class_model):
    """The preview is placed from the run's events, not from the store the worker writes.

    Reproduces the race of a progress signal that arrives while the worker thread
    rewrites the store's ``zarr.json`` (seen as ``TypeError``/``KeyError`` in the Qt
    event loop): the store's metadata is made unreadable before the event is handled.
    """
    import json

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato.api import iter_analyze

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(field, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    out = Path(field).parent / "run.zarr"
    gen = iter_analyze(field, task="nuclei", model=two_class_model, out=out, tile=128,
                       tissue="none")
    event = next(gen)
    assert event.run is not None and event.run.path == out and event.run.kind == "instances"
    meta = out / "zarr.json"
    saved = meta.read_text()
    meta.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    widget._last = {"layer": image, "task": "nuclei"}
    widget._on_progress((0, 1, out, event))  # raised KeyError before the fix
    preview = widget._preview
    assert preview is not None and preview in viewer.layers
    meta.write_text(saved)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result = stop.value
            break
    scale, translate = result.grid.napari_placement()
    assert tuple(preview.scale) == pytest.approx(scale)
    assert tuple(preview.translate) == pytest.approx(translate)
    preview.refresh()
    assert np.array_equal(np.asarray(preview.data[:]), result.labels()[:])
    widget._remove_preview()
    assert preview not in viewer.layers


def test_signals_delivered_inside_a_progress_handler_wait_their_turn(make_napari_viewer, qtbot,
                                                                     field, two_class_model,
                                                                     monkeypatch):
    """napari's progress bar (and adding a layer) may let Qt process events: the run's
    remaining signals (more progress, returned, finished) were then handled *inside* the
    first progress handler, which went on with the cleared run state (``TypeError`` in the
    Qt event loop, seen in CI) or left a "(running)" preview layer behind the results.

    Forced here without timing: the first progress bar waits until the worker thread has
    finished (so every signal is queued) and then processes events.
    """
    from qtpy.QtCore import QCoreApplication, QThreadPool

    import napari_hemato._widgets.analyze as analyze_mod

    real_progress = analyze_mod.napari_progress

    def progress_that_processes_events(*args, **kwargs):
        QThreadPool.globalInstance().waitForDone()
        QCoreApplication.processEvents()
        return real_progress(*args, **kwargs)

    monkeypatch.setattr(analyze_mod, "napari_progress", progress_that_processes_events)
    viewer = make_napari_viewer(show=True)
    viewer.open(field, plugin="napari-hemato")
    widget = analyze_mod.AnalyzeWidget(viewer)
    widget.tile.value = 128  # several tiles: several progress events
    run_analysis(qtbot, widget, task="nuclei", model=two_class_model)
    names = [layer.name for layer in viewer.layers]
    assert not any("(running)" in name for name in names), names
    assert widget.results and widget.results[0].status == "complete"
    assert widget.status.value.startswith("done:")


def test_tissue_mask_shown_edited_and_used(make_napari_viewer, qtbot, tmp_path, two_class_model):
    """Show tissue puts the detected mask over the image as a Labels layer; what the user
    erases there is not read."""
    from napari_hemato._widgets.analyze import AnalyzeWidget

    from .test_tissue import he_slide, write_pyramid

    img, _ = he_slide()  # two tissue blobs, centres (700, 600) and (1450, 1400), on glass
    path = write_pyramid(tmp_path / "he.tif", img, mpp=0.5)
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(path, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    tissue = widget.add_tissue_layer()
    assert widget.tissue.value == "mask layer" and widget.tissue_layer.value is tissue

    def mask_at(y0, x0):  # the mask pixel over level-0 pixel (y0, x0), through world space
        world = np.asarray(image.translate[-2:]) + np.array([y0, x0]) * np.asarray(image.scale[-2:])
        return tissue.data[tuple(np.floor(np.asarray(tissue.world_to_data(world)) + 0.5).astype(int))]

    assert mask_at(700, 600) == 1 and mask_at(1450, 1400) == 1 and mask_at(100, 1900) == 0
    widget.tile.value = 256
    run_analysis(qtbot, widget, task="nuclei", model=two_class_model)
    detected = widget.results[0].store.config["tissue_info"]["tiles_off_tissue"]
    data = tissue.data.copy()
    data[data.shape[0] // 2 :, data.shape[1] // 2 :] = 0  # the user erases the second blob
    tissue.data = data
    run_analysis(qtbot, widget, task="nuclei", model=two_class_model)
    info = widget.results[0].store.config["tissue_info"]
    assert info["source"] == "array" and info["tiles_off_tissue"] > detected
    widget.tissue.value = "whole image"
    run_analysis(qtbot, widget, task="nuclei", model=two_class_model)
    assert widget.results[0].store.config["tissue_info"] is None


def test_show_tissue_on_a_smear_shows_its_reading_zone(make_napari_viewer, tmp_path):
    """On a smear scan Show tissue gives the reading zone (the monolayer band of the scan
    below) to paint; on a camera field it says the field is read whole and adds nothing."""
    from napari_hemato._widgets.analyze import AnalyzeWidget

    from .test_reading_zone import smear_scan
    from .test_tissue import write_pyramid

    img, b = smear_scan(mpp=0.25)
    viewer = make_napari_viewer()
    [image] = viewer.open(write_pyramid(tmp_path / "smear.tif", img, mpp=0.25), plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    widget.task.value = "smear"
    zone = widget.add_tissue_layer()
    assert zone is not None and widget.tissue.value == "mask layer"
    rows = np.asarray(zone.data).any(axis=1)
    assert rows.any()
    ys = np.flatnonzero(rows) * img.shape[0] / rows.size  # level-0 rows with zone
    assert ys.min() > 2 * b - 100 and ys.max() < 3 * b + 100
    field = viewer.add_image(img[2 * b : 2 * b + 480, :640], name="field")
    widget.image.value = field
    widget.task.value = "smear"  # (choosing an image suggests a task)
    n = len(viewer.layers)
    assert widget.add_tissue_layer() is None and len(viewer.layers) == n
    assert "whole image" in widget.status.value
