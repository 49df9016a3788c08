"""Model specs and the onnxruntime backend, with tiny ONNX models built here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.engine import run
from napari_hemato.core.errors import ModelError
from napari_hemato.core.slide import open_slide
from napari_hemato.core.spec import load_spec, write_spec
from napari_hemato.models.fake import DarkBlobPredictor
from napari_hemato.models.onnx_backend import OnnxPredictor, load_session, resolve_providers

from .onnx_models import build_dark_blob_onnx, dark_blob_model_dir
from .synthetic import disk_image, write_tiff

pytest.importorskip("onnx")


@pytest.fixture
def model_dir(tmp_path):
    return dark_blob_model_dir(tmp_path / "model")


def test_spec_roundtrip_and_halo(model_dir):
    spec = load_spec(model_dir)
    assert spec.halo == 40 + 2  # 20 µm at 0.5 µm/px + receptive field
    assert spec.onnx_path == model_dir / "model.onnx"
    assert load_spec(model_dir / "model.json") == spec


def test_onnx_matches_the_reference_model(model_dir):
    predictor = OnnxPredictor(model_dir)
    batch = disk_image((64, 80), n=5)[None].repeat(2, axis=0)
    got = predictor.predict(batch)["foreground"]
    want = DarkBlobPredictor(predictor.spec).predict(batch)["foreground"]
    assert got.shape == (2, 1, 64, 80)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sessions_are_cached(model_dir):
    a = OnnxPredictor(model_dir).session
    b = OnnxPredictor(model_dir).session
    assert a is b


def test_onnx_model_through_engine_tiled_equals_untiled(tmp_path, model_dir):
    path = write_tiff(tmp_path / "d.tif", disk_image((400, 500), n=60, seed=2), mpp=0.5)
    slide = open_slide(path)
    predictor = OnnxPredictor(model_dir)
    a = run(slide, predictor, out=tmp_path / "a.zarr", tile=128)
    b = run(slide, predictor, out=tmp_path / "b.zarr", tile=2048)
    assert len(a.table()) == len(b.table()) == 60
    np.testing.assert_array_equal(a.labels()[:] > 0, b.labels()[:] > 0)


def test_cpu_is_default_and_unknown_provider_is_refused():
    assert resolve_providers(None) == ("CPUExecutionProvider",)
    assert "CPUExecutionProvider" in resolve_providers("auto")
    with pytest.raises(ModelError, match="not available"):
        resolve_providers(["NoSuchExecutionProvider"])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_onnx", "not found"),
        ("empty_onnx", "empty"),
        ("corrupt_onnx", "cannot load ONNX model"),
        ("replaced_onnx", "model.onnx does not match model.json: sha256"),
        ("missing_spec", "model spec not found"),
        ("bad_json", "not valid JSON"),
        ("unknown_field", "unknown spec field"),
        ("wrong_output", "not in the model's outputs"),
        ("wrong_channels", "expects 4 channels"),
        ("bad_kind", "kind 'segmenter'"),
        ("no_mpp", "needs a positive 'mpp'"),
    ],
)
def test_broken_models_give_clear_errors(tmp_path, model_dir, damage, message):
    spec_path = model_dir / "model.json"
    raw = json.loads(spec_path.read_text())
    if damage == "missing_onnx":
        (model_dir / "model.onnx").unlink()
    elif damage == "empty_onnx":
        (model_dir / "model.onnx").write_bytes(b"")
    elif damage == "corrupt_onnx":
        (model_dir / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
        write_spec(model_dir, raw)  # a spec that vouches for the broken file
    elif damage == "replaced_onnx":
        build_dark_blob_onnx(model_dir / "model.onnx", level=0.6)
    elif damage == "missing_spec":
        spec_path.unlink()
    elif damage == "bad_json":
        spec_path.write_text("{not json")
    elif damage == "unknown_field":
        spec_path.write_text(json.dumps({**raw, "colour": "blue"}))
    elif damage == "wrong_output":
        spec_path.write_text(json.dumps({**raw, "outputs": {"foreground": "nope"}}))
    elif damage == "wrong_channels":
        build_dark_blob_onnx(model_dir / "model.onnx", channels=4)
        write_spec(model_dir, raw)
    elif damage == "bad_kind":
        spec_path.write_text(json.dumps({**raw, "kind": "segmenter"}))
    elif damage == "no_mpp":
        spec_path.write_text(json.dumps({**raw, "mpp": None}))
    with pytest.raises(ModelError, match=message):
        OnnxPredictor(model_dir)


def test_wrong_input_shape_is_refused(model_dir):
    predictor = OnnxPredictor(model_dir)
    with pytest.raises(ModelError, match=r"expected \(N, H, W, 3\)"):
        predictor.predict(np.zeros((1, 32, 32), np.uint8))


def test_cancel_before_run_terminates_inference(model_dir):
    predictor = OnnxPredictor(model_dir)
    token = CancelToken()
    token.cancel()
    from napari_hemato.core.errors import Cancelled

    with pytest.raises(Cancelled):
        predictor.predict(np.zeros((2, 512, 512, 3), np.uint8), cancel=token)


def test_load_session_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_session(tmp_path / "none.onnx")


def test_onnx_predictor_pickles_for_dask_workers(model_dir):
    import pickle

    predictor = OnnxPredictor(model_dir)
    clone = pickle.loads(pickle.dumps(predictor))
    batch = np.zeros((1, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(clone.predict(batch)["foreground"], predictor.predict(batch)["foreground"])
