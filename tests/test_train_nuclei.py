"""Nucleus model: a tiny training run + export on real crops, and the shipped model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.spec import load_spec
from napari_hemato.models.registry import BUNDLED

BUNDLED_NUCLEI = BUNDLED / "nuclei"


def _tiny_dataset(shared_data: Path, root: Path) -> Path:
    """Two 96×128 crops of real MICCAI tiles in the data folder layout."""
    import tifffile
    from skimage.io import imread, imsave

    src = shared_data / "nuclei_he_miccai"
    dst = root / "nuclei_he_miccai"
    dst.mkdir(parents=True)
    for stem in ("image01", "image04"):  # image04 is held out for validation
        img = imread(src / f"{stem}.png")[:96, :128, :3]
        lab = tifffile.imread(src / f"{stem}_label.tif")[:96, :128]
        imsave(dst / f"{stem}.png", img, check_contrast=False)
        tifffile.imwrite(dst / f"{stem}_label.tif", lab)
    return root


@pytest.mark.shared_data
def test_tiny_training_exports_a_valid_model(shared_data, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import onnxruntime as ort
    from skimage.io import imread

    from napari_hemato.train.evaluate_nuclei import evaluate_nuclei
    from napari_hemato.train.nets import SigmoidOutputs
    from napari_hemato.train.nuclei import train_nuclei

    data = _tiny_dataset(shared_data, tmp_path / "data")
    out = tmp_path / "model"
    kw = dict(steps_per_epoch=2, batch_size=2, crop=64, widths=(8, 16), head_channels=4, threads=1)
    t0 = time.perf_counter()
    result = train_nuclei(data, out, epochs=1, seed=1, **kw)
    assert time.perf_counter() - t0 < 30
    assert result["val_keys"] == ["nuclei_he_miccai/image04"]
    assert (out / "checkpoint.safetensors").exists() and not (out / "checkpoint.pt").exists()

    spec = load_spec(out)
    assert spec.task == "nuclei" and spec.kind == "instances" and spec.mpp == 0.5
    assert spec.size_divisor == 4 and spec.receptive_field_px > 0
    assert [e["key"] for e in spec.extra["validation_images"]] == ["nuclei_he_miccai/image04"]

    # onnxruntime agrees with torch on a real crop, with a batch of 2 and odd sizes
    sess = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    rgb = imread(data / "nuclei_he_miccai" / "image01.png")
    batch = np.stack([rgb[:48, :60], rgb[40:88, 60:120]])
    x = spec.normalize(batch)
    fg, dist = sess.run([spec.outputs["foreground"], spec.outputs["distance"]], {"image": x})
    assert fg.shape == dist.shape == (2, 1, 48, 60)
    with torch.no_grad():
        ref = SigmoidOutputs(result["model"].eval())(torch.from_numpy(x))
    assert np.abs(ref[0].numpy() - fg).max() < 1e-4
    assert np.abs(ref[1].numpy() - dist).max() < 1e-4

    # resume continues from the checkpoint
    again = train_nuclei(data, out, epochs=2, seed=1, resume=True, export=False, **kw)
    assert [h["epoch"] for h in again["history"]] == [0, 1]

    metrics = evaluate_nuclei(out, data, threads=1)
    assert metrics["per_image"][0]["key"] == "nuclei_he_miccai/image04"
    assert metrics["weights"] == "float"
    for key in ("f1", "aji_mean", "map_mean"):
        assert 0.0 <= metrics["pooled"][key] <= 1.0

    # the int8 network the CPU runs, calibrated on the training image only, scored beside it
    from napari_hemato.models.onnx_backend import OnnxPredictor
    from napari_hemato.train.evaluate_nuclei import evaluate_both
    from napari_hemato.train.quantize import quantize_folder

    quantize_folder(out, data, n_crops=4)
    spec = load_spec(out)
    assert spec.extra["quantization"]["calibration"]["images"] == 1  # image01; image04 held out
    assert OnnxPredictor(out).precision == "int8"
    both = evaluate_both(out, data, threads=1)
    assert both["weights"] == "int8" and both["per_image"][0]["key"] == "nuclei_he_miccai/image04"
    assert set(both["float_weights"]["pooled"]) == set(both["pooled"])


def test_training_takes_the_plugins_exports_alongside_the_reference_data(tmp_path):
    """``--data EXPORT_DIR`` (corrected nuclei exported by the plugin) adds training images;
    an export-only run trains, exports and records where its images came from."""
    pytest.importorskip("torch")
    from skimage.io import imsave

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.export.formats import export_annotations
    from napari_hemato.train.nuclei import main, train_nuclei

    rng = np.random.default_rng(0)
    image = rng.integers(200, 250, (160, 160, 3), dtype=np.uint8)
    labels = np.zeros((160, 160), np.uint32)
    yy, xx = np.indices(labels.shape)
    for k, (cy, cx) in enumerate([(30, 30), (30, 90), (90, 50), (120, 120), (60, 130)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] = k
    image[labels > 0] = (90, 40, 120)
    imsave(tmp_path / "he.png", image, check_contrast=False)
    table = pd.DataFrame({"id": np.arange(1, 6), "class": ["nucleus"] * 5, "reviewed": [True] * 5})
    ann = AnnotationSet("instances", table, ["nucleus"], labels, (0, 0), 0.5, str(tmp_path / "he.png"),
                        (160, 160))
    export_annotations(ann, tmp_path / "exports", ["tiff"], name="he")

    kw = dict(steps_per_epoch=2, batch_size=2, crop=64, widths=(8, 16), head_channels=4, threads=1)
    result = train_nuclei([tmp_path / "exports"], tmp_path / "m", epochs=1, seed=0, **kw)
    assert result["train_keys"] == ["export/he_labels.tif"] and result["val_keys"] == []
    spec = load_spec(tmp_path / "m")
    assert spec.extra["export_images"] == [{"key": "export/he_labels.tif", "mpp": 0.5}]
    # the CLI path: an export-only run has no reference data to tune or validate on, and says so
    assert main(["--data", str(tmp_path / "exports"), "--out", str(tmp_path / "m2"), "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "64"]) == 0
    assert (tmp_path / "m2" / "model.onnx").exists() and not (tmp_path / "m2" / "metrics.json").exists()


@pytest.fixture(scope="module")
def bundled_spec():
    if not (BUNDLED_NUCLEI / "model.json").exists() or not (BUNDLED_NUCLEI / "model.onnx").exists():
        pytest.skip("bundled nucleus model not present yet")
    return load_spec(BUNDLED_NUCLEI)


def test_bundled_model_spec(bundled_spec):
    spec = bundled_spec
    assert spec.task == "nuclei" and spec.kind == "instances"
    assert spec.mpp == 0.5 and spec.class_names == ("nucleus",)
    assert set(spec.outputs) == {"foreground", "distance", "features"}  # features: fine-tuning only
    assert spec.extra["validation_images"]
    assert spec.onnx_path.stat().st_size < 20e6
    metrics = json.loads((BUNDLED_NUCLEI / "metrics.json").read_text())
    assert metrics["model"] == spec.name


@pytest.mark.shared_data
def test_bundled_model_finds_nuclei_on_real_he(bundled_spec, shared_data):
    import onnxruntime as ort
    from skimage.io import imread

    from napari_hemato.core.postprocess import postprocess_instances

    spec = bundled_spec
    rgb = imread(shared_data / "slides" / "he_histo_stardist.jpg")[:256, :256, :3]
    sess = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    names = [spec.outputs["foreground"], spec.outputs["distance"]]
    fg, dist = sess.run(names, {spec.input_name: spec.normalize(rgb[None])})
    assert fg.shape == dist.shape == (1, 1, 256, 256)
    for m in (fg, dist):
        assert m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0
    labels = postprocess_instances(spec.postprocess, spec.mpp, fg[0, 0], dist[0, 0])
    n = int(labels.max())
    assert 10 < n < 1000, n
