"""The task registry: adding a task is one module (here: a class in the test) and a model.

A toy task registered from outside the package runs through the API, the CLI and
the Analyse widget; nothing else in the package knows its name.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from napari_hemato.tasks import Task, get_task, register, task_for, task_names, unregister

from .onnx_models import dark_blob_model_dir
from .synthetic import disk_image, write_tiff

pytest.importorskip("onnx")


class ToyTask(Task):
    """Counts dark blobs; its summary says how many are 'big'."""

    name = "toyblobs"
    title = "toy blob counting (test only)"
    prepared = 0
    finished = 0

    def prepare_slide(self, slide, predictor, *, roi=None, estimate_mpp=True):
        ToyTask.prepared += 1
        return slide

    def finish(self, result, slide, stages):
        ToyTask.finished += 1

    def summary(self, table, *, area_mm2=None, mpp=None, region=None):
        return {"big_blobs": int((table["area_px"] > 10).sum()), "area_checked_mm2": area_mm2}

    def summary_lines(self, summary):
        return [f"big blobs: {summary['big_blobs']}"]


@pytest.fixture
def toy(tmp_path):
    model = dark_blob_model_dir(tmp_path / "toy_model", task="toyblobs", name="toy-blobs")
    task = register(ToyTask())
    yield task, model
    unregister("toyblobs")


@pytest.fixture
def image(tmp_path):
    return write_tiff(tmp_path / "blobs.tif", disk_image((300, 300), n=12, seed=3), mpp=0.5)


def test_builtin_tasks_are_found():
    assert {"nuclei", "smear", "mitosis"} <= set(task_names())
    assert get_task("smear").summary_lines(get_task("smear").summary(
        pd.DataFrame({"class": ["LY", "RBC"], "cell_type": ["WBC", "RBC"]})))[-1] == "RBC 1, platelets 0"
    with pytest.raises(Exception, match="unknown task 'nope'"):
        get_task("nope")


def test_task_for_objects_without_a_recorded_model():
    from napari_hemato.core.annotations import AnnotationSet

    points = AnnotationSet("points", pd.DataFrame({"class": []}), ["mitosis"])
    cells = AnnotationSet("instances", pd.DataFrame({"class": [], "cell_type": []}), ["RBC"])
    made = AnnotationSet("instances", pd.DataFrame({"class": []}), ["nucleus"],
                         metadata={"model": {"task": "nuclei"}})
    assert (task_for(points).name, task_for(cells).name, task_for(made).name) == (
        "mitosis", "smear", "nuclei")


def test_a_registered_task_runs_through_the_api(toy, image):
    import napari_hemato as nh

    task, model = toy
    before = (ToyTask.prepared, ToyTask.finished)
    result = nh.analyze(image, task="toyblobs", model=model)
    assert result.status == "complete" and len(result.table()) == 12
    assert (ToyTask.prepared, ToyTask.finished) == (before[0] + 1, before[1] + 1)
    with pytest.raises(Exception, match="is for task 'nuclei', not 'toyblobs'"):
        nh.analyze(image, task="toyblobs", model=dark_blob_model_dir(image.parent / "n"))


def test_a_registered_task_runs_through_the_cli(toy, image, capsys):
    from napari_hemato.cli import main

    task, model = toy
    out = image.parent / "toy.zarr"
    assert main(["analyze", str(image), "--task", "toyblobs", "--model", str(model),
                 "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["task"] == "toyblobs" and s["n_objects"] == 12
    assert s["big_blobs"] == 12 and s["area_checked_mm2"] == pytest.approx(300 * 300 * 0.25 / 1e6)
    assert main(["analyze", str(image), "--task", "toyblobs", "--model", str(model),
                 "--out", str(image.parent / "toy2.zarr")]) == 0
    assert "big blobs: 12" in capsys.readouterr().out


@pytest.mark.gui
def test_a_registered_task_runs_through_the_analyse_widget(toy, image, make_napari_viewer, qtbot):
    from napari_hemato._widgets.analyze import AnalyzeWidget

    task, model = toy
    viewer = make_napari_viewer()
    viewer.open(image, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    assert "toyblobs" in widget.task.choices
    widget.task.value = "toyblobs"
    widget.model.value = str(model)
    widget.start()
    with qtbot.waitSignal(widget.worker.finished, timeout=300_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.results[0].status == "complete"
    assert len(viewer.layers[-1].features) == 12
