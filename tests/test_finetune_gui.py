"""'Fine-tune on my corrections' in the Review dock: corrections of a smear field refit the
WBC classifier in a worker (progress, cancel), and the Analyse dock runs the new model;
corrected nuclei refit the nucleus segmenter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.io.layers import annotation_layer_data
from napari_hemato.models.cell_classifier import CLASS_NAMES, CellClassifier
from napari_hemato.tasks import get_task

from .wbc_cells import NEW_LAB, cell, finetunable_wbc_model

pytestmark = pytest.mark.gui
pytest.importorskip("onnx")
TYPES = ["RBC", "WBC", "Platelets"]
N_WBC, SIDE = 12, 48


def smear_field(tmp_path):
    """A field of ``N_WBC`` white cells of a stain the model never saw, called SNE, with labels."""
    rng = np.random.default_rng(0)
    rows_n = 3
    image = np.full((rows_n * SIDE, (N_WBC // rows_n) * SIDE, 3), 235, np.uint8)
    labels = np.zeros(image.shape[:2], np.uint32)
    rows = []
    yy, xx = np.mgrid[:SIDE, :SIDE]
    disc = (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 < (SIDE / 3.2) ** 2
    for i in range(1, N_WBC + 1):
        y0, x0 = SIDE * ((i - 1) // (N_WBC // rows_n)), SIDE * ((i - 1) % (N_WBC // rows_n))
        image[y0:y0 + SIDE, x0:x0 + SIDE] = cell(NEW_LAB, rng, SIDE)
        labels[y0:y0 + SIDE, x0:x0 + SIDE][disc] = i
        ys, xs = np.nonzero(labels == i)
        rows.append({"id": i, "y": ys.mean(), "x": xs.mean(), "bbox_y0": ys.min(), "bbox_x0": xs.min(),
                     "bbox_y1": ys.max() + 1, "bbox_x1": xs.max() + 1, "area_px": float(len(ys)),
                     "class": "SNE", "cell_type": "WBC", "confidence": 0.5, "provenance": "auto",
                     "reviewed": False, **{f"prob_{c}": v for c, v in zip(TYPES, [0.05, 0.9, 0.05], strict=True)},
                     **{f"prob_{c}": 0.5 if c == "SNE" else 0.05 for c in CLASS_NAMES}})
    path = tmp_path / "field.png"
    Image.fromarray(image).save(path)
    ann = AnnotationSet("instances", pd.DataFrame(rows), TYPES + list(CLASS_NAMES), labels,
                        mpp=None, image_path=str(path), image_shape=labels.shape,
                        metadata={"model": {"task": "smear"}})
    return path, ann


def test_finetune_from_the_review_dock_then_run_the_new_model(make_napari_viewer, qtbot, tmp_path,
                                                              monkeypatch):
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.tasks.smear import SmearTask

    stages = []
    load_stages = SmearTask.load_stages

    def spy(self, **options):
        stages.append(options.get("classifier"))
        return load_stages(self, **options)

    monkeypatch.setattr(SmearTask, "load_stages", spy)

    base = finetunable_wbc_model(tmp_path / "base")
    path, ann = smear_field(tmp_path)
    viewer = make_napari_viewer()
    viewer.open(path, plugin="napari-hemato")
    data, kwargs, _ = annotation_layer_data(ann, name="field smear")
    layer = viewer.add_labels(data, **kwargs)
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    analyze.task.value = "nuclei"
    assert analyze.stage_model.native.isHidden()  # nuclei have no second model
    analyze.task.value = "smear"
    assert not analyze.stage_model.native.isHidden() and analyze.stage_model.label == "WBC classifier"
    analyze.stage_model.value = str(base)  # the classifier the user runs: the fine-tune's base
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    viewer.layers.selection.active = layer
    target = next(c for c in ("MO", "LY", "EO")  # a class the base never gives these cells
                  if not (CellClassifier(base).classify_crops([cell(NEW_LAB, np.random.default_rng(9))],
                                                              [30.0])[0].argmax(1) == CLASS_NAMES.index(c)).any())
    for i in range(1, N_WBC + 1):
        review.select(i)
        review.set_class(target)

    panel = review.finetune
    steps = []
    panel_progress = panel._on_progress
    panel._on_progress = lambda item: (steps.append(item), panel_progress(item))  # connected by start()
    panel.start()
    assert not panel.button.isEnabled() and panel.cancel_button.isEnabled()
    with qtbot.waitSignal(panel.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is not None, panel.status.text()
    folder = panel.result.folder
    assert folder.parent.name == "finetuned-models" and (folder / "model.onnx").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".corrections")]  # cleaned
    assert panel.result.corrections["cells"] == N_WBC
    assert steps and steps[0][0] == "reading the corrections" and steps[-1] == ("done", 1.0)
    assert analyze.stage_model.value == str(folder) and "WBC classifier" in panel.status.text()
    assert analyze.image.value.metadata["napari_hemato"]["path"] == str(path)
    assert panel.rerun_button.isEnabled() and panel.button.isEnabled()
    probs = CellClassifier(folder).classify_crops([cell(NEW_LAB, np.random.default_rng(k)) for k in range(5)],
                                                  [30.0] * 5)[0]
    assert (probs.argmax(1) == CLASS_NAMES.index(target)).mean() >= 0.8
    # 'Run the new model': the Analyse dock runs the image with it; the corrected layer stays
    n_layers = len(viewer.layers)
    panel.rerun_button.click()
    with qtbot.waitSignal(analyze.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: analyze.worker is None, timeout=60_000)
    assert stages == [str(folder)], analyze.status.value
    assert analyze.status.value.startswith("done") and len(viewer.layers) == n_layers + 1
    assert (layer.features["class"] == target).all()  # the corrections are untouched

    # cancel: nothing written, a clear status
    n_models = len(list(folder.parent.iterdir()))
    panel.start()
    panel.cancel()
    with qtbot.waitSignal(panel.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.status.text() == "cancelled: no model was written"
    assert len(list(folder.parent.iterdir())) == n_models


def test_corrected_nuclei_refit_the_segmenter_from_the_review_dock(make_napari_viewer, qtbot, tmp_path):
    """A nuclei layer of the bundled sample, each nucleus painted 1 µm wider: the panel exports
    the layer, refits the bundled segmenter and sets the new model in the Analyse dock."""
    from skimage.segmentation import expand_labels

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.api import analyze as run
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.slide import open_slide, to_rgb8
    from napari_hemato.samples import sample_path

    with open_slide(sample_path("he_slide")) as slide:
        image = to_rgb8(slide.read_region(0, 1100, 900, 1484, 1284))
    path = tmp_path / "crop.png"
    Image.fromarray(image).save(path)
    ann = from_result(run(path, task="nuclei", mpp=0.5, out=tmp_path / "run.zarr", threads=1, tissue="none"))
    ann.labels = expand_labels(np.asarray(ann.labels), 2).astype(np.uint32)
    viewer = make_napari_viewer()
    data, kwargs, _ = annotation_layer_data(ann, name="crop nuclei")
    viewer.layers.selection.active = viewer.add_labels(data, **kwargs)
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    panel = review.finetune
    panel.start()
    with qtbot.waitSignal(panel.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is not None, panel.status.text()
    folder = panel.result.folder
    assert folder.name.startswith("nuclei-") and panel.result.corrections["regions"] == 1
    assert analyze.task.value == "nuclei" and analyze.model.value == str(folder)
    assert "reference F1" in panel.status.text() and "model folder" in panel.status.text()


def test_a_task_without_a_finetune_says_so(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.tasks.nuclei import NucleiTask

    monkeypatch.setattr(NucleiTask, "finetune_kind", None)  # every bundled task has one now
    _, ann = smear_field(tmp_path)
    ann.metadata = {"model": {"task": "nuclei"}}
    viewer = make_napari_viewer()
    data, kwargs, _ = annotation_layer_data(ann, name="nuclei")
    viewer.layers.selection.active = viewer.add_labels(data, **kwargs)
    review = ReviewWidget(viewer)
    review.finetune.start()
    assert review.finetune.worker is None
    assert "nuclei: no fine-tuning from corrections yet" in review.finetune.status.text()


def test_a_smear_layer_offers_its_cell_detector_too(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A smear layer's corrections feed two models: the panel offers the choice; "cells" exports
    the reviewed masks as a label TIFF, runs ``finetune smear`` (stubbed here: the core is
    tested in test_finetune_smear.py) and sets the new model as the Analyse dock's *model*
    (the WBC classifier field keeps its value)."""
    import napari_hemato.api as api
    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.finetune.common import FinetuneResult

    calls = []

    def fake_finetune(kind, data, out, *, base=None, progress=None, **options):
        exported = sorted(p.name for p in data[0].iterdir())
        calls.append((kind, exported, base))
        progress("reading the corrections", 0.0)
        out.mkdir(parents=True)
        return FinetuneResult(out, {"headline": "reference objective 0.861 → 0.864"}, {"regions": 1}, 0.1)

    monkeypatch.setattr(api, "finetune", fake_finetune)
    _, ann = smear_field(tmp_path)
    ann.mpp = 0.08
    viewer = make_napari_viewer()
    data, kwargs, _ = annotation_layer_data(ann, name="field smear")
    layer = viewer.add_labels(data, **kwargs)
    analyze = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(analyze, name="Analyse")
    analyze.task.value = "smear"
    analyze.stage_model.value = "my_wbc_classifier"
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    viewer.layers.selection.active = layer
    panel = review.finetune
    assert not panel.kind_box.isHidden()
    assert [panel.kind_box.itemData(i) for i in range(panel.kind_box.count())] == ["wbc", "smear"]
    panel.kind_box.setCurrentIndex(1)
    panel.start()
    with qtbot.waitSignal(panel.worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is not None, panel.status.text()
    (kind, exported, base), = calls
    assert kind == "smear" and "field_labels.tif" in exported and base is None
    assert panel.result.folder.name.startswith("smear-")
    assert analyze.model.value == str(panel.result.folder) and analyze.stage_model.value == "my_wbc_classifier"
    assert "model folder" in panel.status.text()
    # a nuclei layer has one fine-tune: no choice shown
    nuclei = AnnotationSet("instances", ann.table.assign(**{"class": "nucleus"}), ["nucleus"], ann.labels,
                           mpp=0.5, image_path=ann.image_path, image_shape=ann.image_shape,
                           metadata={"model": {"task": "nuclei"}})
    data, kwargs, _ = annotation_layer_data(nuclei, name="nuclei")
    viewer.layers.selection.active = viewer.add_labels(data, **kwargs)
    assert panel.kind_box.isHidden() and panel.kind(get_task("nuclei")) == "nuclei"
