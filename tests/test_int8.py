"""Int8 networks beside the float one: made from calibration crops, checked, chosen on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_hemato.core.engine import run
from napari_hemato.core.errors import ModelError, StoreError
from napari_hemato.core.slide import open_slide
from napari_hemato.core.spec import load_spec
from napari_hemato.models.onnx_backend import OnnxPredictor
from tests.onnx_models import dark_blob_model_dir
from tests.synthetic import disk_image, write_tiff

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    from napari_hemato.train.quantize import add_int8, calibration_crops

    folder = dark_blob_model_dir(tmp_path_factory.mktemp("models") / "blobs")
    images = [disk_image((200, 240), n=30, seed=s) for s in range(3)]
    return add_int8(folder, calibration_crops(images, n=6, size=96), version="0.0.2")


def test_the_cpu_runs_the_int8_network_and_it_agrees_with_the_float_one(int8_model):
    spec = load_spec(int8_model)
    assert spec.version == "0.0.2" and spec.int8["onnx"] == "model_int8.onnx"
    assert len(spec.int8["sha256"]) == 64
    assert spec.extra["quantization"]["calibration"]["crops"] == 6
    fast, ref = OnnxPredictor(int8_model), OnnxPredictor(int8_model, precision="float")
    assert fast.precision == "int8" and fast.weights_path.name == "model_int8.onnx"
    assert ref.precision == "float" and ref.weights_path.name == "model.onnx"
    batch = disk_image((128, 160), n=12, seed=9)[None]
    a, b = fast.predict(batch)["foreground"], ref.predict(batch)["foreground"]
    assert a.shape == b.shape
    assert float(np.abs(a - b).mean()) < 0.02
    assert ((a > 0.5) == (b > 0.5)).mean() > 0.98


def test_a_damaged_int8_file_is_refused_and_float_still_loads(int8_model, tmp_path):
    folder = Path(shutil.copytree(int8_model, tmp_path / "m"))
    (folder / "model_int8.onnx").write_bytes((folder / "model_int8.onnx").read_bytes()[:-10])
    with pytest.raises(ModelError, match="model_int8.onnx does not match model.json"):
        OnnxPredictor(folder)
    assert OnnxPredictor(folder, precision="float").precision == "float"


def test_int8_is_asked_of_a_model_without_one(tmp_path):
    folder = dark_blob_model_dir(tmp_path / "plain")
    assert OnnxPredictor(folder).precision == "float"  # auto: nothing to choose
    with pytest.raises(ModelError, match="has no int8 network"):
        OnnxPredictor(folder, precision="int8")
    with pytest.raises(ModelError, match="precision 'half'"):
        OnnxPredictor(folder, precision="half")
    assert "int8" not in load_spec(folder).to_dict()  # specs without one read as before


def test_bad_int8_entries_are_refused(int8_model, tmp_path):
    folder = Path(shutil.copytree(int8_model, tmp_path / "m"))
    raw = json.loads((folder / "model.json").read_text())
    for bad in ({"file": "x.onnx"}, {"onnx": "model_int8.onnx", "sha256": "abc"},
                {"onnx": "model_int8.onnx", "scale": 1}):
        (folder / "model.json").write_text(json.dumps({**raw, "int8": bad}))
        with pytest.raises(ModelError, match="int8"):
            load_spec(folder)


def test_a_run_records_its_network_and_does_not_resume_with_the_other(int8_model, tmp_path):
    slide = open_slide(write_tiff(tmp_path / "d.tif", disk_image((300, 360), n=40), mpp=0.5))
    out = tmp_path / "r.zarr"
    result = run(slide, OnnxPredictor(int8_model), out=out, tile=96)
    assert result.store.config["model"]["weights"] == "int8"
    with pytest.raises(StoreError, match="differs in model"):
        run(slide, OnnxPredictor(int8_model, precision="float"), out=out, tile=96, resume=True)


def test_a_fine_tuned_copy_does_not_inherit_the_base_int8_network(int8_model, tmp_path):
    import onnx

    from napari_hemato.finetune.common import write_model_folder

    out = write_model_folder(tmp_path / "tuned", int8_model, onnx.load(int8_model / "model.onnx"),
                             {"version": "0.0.3"}, "card", {})
    spec = load_spec(out)
    assert spec.int8 is None and "quantization" not in spec.extra
    assert OnnxPredictor(out).precision == "float"


def test_the_int8_network_runs_with_its_own_post_processing(int8_model, tmp_path):
    """A threshold calibrated on the int8 network's scores replaces the float one's when (and
    only when) the int8 network runs."""
    from napari_hemato.core.spec import write_spec

    folder = Path(shutil.copytree(int8_model, tmp_path / "m"))
    raw = json.loads((folder / "model.json").read_text())
    raw["int8"]["postprocess"] = {"threshold": 0.4}
    write_spec(folder, raw)
    assert load_spec(folder).int8["postprocess"] == {"threshold": 0.4}  # kept by write_spec
    fast, ref = OnnxPredictor(folder), OnnxPredictor(folder, precision="float")
    assert fast.spec.postprocess["threshold"] == 0.4
    assert ref.spec.postprocess["threshold"] == 0.5
    assert fast.spec.postprocess["min_area_um2"] == ref.spec.postprocess["min_area_um2"]
    assert fast.spec.fingerprint != ref.spec.fingerprint  # a run knows which values it used


@pytest.mark.parametrize("precision", ["int8", "float"])
def test_a_threshold_sweep_copy_runs_the_network_it_sweeps(int8_model, tmp_path, precision):
    from napari_hemato.train.evaluate_mitosis import LOW_THRESHOLD, _low_threshold_copy

    low = _low_threshold_copy(load_spec(int8_model), tmp_path / "low", precision)
    predictor = OnnxPredictor(low)
    assert predictor.precision == precision
    assert predictor.spec.postprocess["threshold"] == LOW_THRESHOLD


@pytest.mark.shared_data
def test_mitosis_calibration_uses_training_material_only(shared_data, tmp_path, monkeypatch):
    from napari_hemato.train import data_mitosis as dm
    from napari_hemato.train.quantize import quantize_folder
    from tests.onnx_models import tiny_mitosis_model_dir

    folder = tiny_mitosis_model_dir(tmp_path / "m")
    frame = dm.read_crops_table(shared_data)
    split = dm.split_slides(frame["slide"].to_numpy(object), frame["dataset"].to_numpy(object))
    loaded, parts = [], []
    load_crops, regions = dm.load_crops, dm.tissue_regions
    monkeypatch.setattr(dm, "load_crops", lambda f, **kw: loaded.append(f) or load_crops(f, **kw))
    monkeypatch.setattr(dm, "tissue_regions", lambda d, *, part, mpp: parts.append(part) or regions(
        d, part=part, mpp=mpp))
    quantize_folder(folder, shared_data, n_crops=8)
    assert parts == ["train"]
    (figures,) = loaded
    assert len(figures) == 4 and set(figures["slide"]) <= set(split["train"])
    calibration = load_spec(folder).extra["quantization"]["calibration"]
    assert calibration["crops"] == 8 and calibration["figure_crops"] == 4
    assert OnnxPredictor(folder).precision == "int8"


@pytest.mark.parametrize("precision", [None, "float"])
def test_analyze_runs_the_network_asked_for(int8_model, tmp_path, precision):
    from napari_hemato.cli import main
    from napari_hemato.core.store import ResultStore

    field = write_tiff(tmp_path / "f.tif", disk_image((200, 260), n=20), mpp=0.5)
    out = tmp_path / "r.zarr"
    argv = ["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model",
            str(int8_model), "--out", str(out)]
    assert main(argv + (["--precision", precision] if precision else [])) == 0
    assert ResultStore.open(out).config["model"]["weights"] == (precision or "int8")
