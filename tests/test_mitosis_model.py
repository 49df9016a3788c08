"""The shipped mitosis model through the real runtime path (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.spec import load_spec
from napari_hemato.models.registry import BUNDLED

BUNDLED_MITOSIS = BUNDLED / "mitosis"

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MITOSIS / "model.onnx").exists(), reason="bundled mitosis model not present"
)


def test_bundled_spec_is_consistent():
    spec = load_spec(BUNDLED_MITOSIS)
    assert spec.task == "mitosis" and spec.kind == "points"
    assert spec.class_names == ("normal", "atypical")
    assert spec.mpp == 0.25 and spec.pad_value == 255
    assert spec.postprocess["min_distance_um"] == 7.5
    assert 0 < spec.postprocess["threshold"] < 1
    assert spec.onnx_path.stat().st_size <= 20e6
    held = spec.extra["validation_slides"]
    assert held["test"] and held["tune"] and not set(held["test"]) & set(held["tune"])


@pytest.mark.shared_data
def test_finds_held_out_figures_on_tissue(shared_data, tmp_path):
    from skimage.io import imread, imsave

    from napari_hemato.api import analyze
    from napari_hemato.core.metrics import match_points
    from napari_hemato.train.data_mitosis import read_crops_table

    spec = load_spec(BUNDLED_MITOSIS)
    table = read_crops_table(shared_data)
    held = table[table["slide"].isin(spec.extra["validation_slides"]["test"])]
    rows = held.sort_values("file").iloc[[0, len(held) // 2, -1]]
    # background: a held-out 40x MICCAI tile (never a training negative), 0.25 µm/px
    canvas = imread(shared_data / "nuclei_he_miccai" / "image14.png")[:448, :448, :3].copy()
    corners = [(20, 30), (40, 290), (290, 160)]
    truth = []
    for (y, x), path in zip(corners, rows["path"], strict=True):
        canvas[y : y + 128, x : x + 128] = imread(path)[..., :3]
        truth.append((y + 64, x + 64))
    imsave(tmp_path / "canvas.png", canvas, check_contrast=False)

    result = analyze(tmp_path / "canvas.png", task="mitosis", mpp=0.25,
                     out=tmp_path / "res.zarr", threads=2)
    found = result.table()
    for col in ("y", "x", "score", "class", "confidence", "prob_normal", "prob_atypical"):
        assert col in found.columns
    assert set(found["class"]) <= {"normal", "atypical"}
    np.testing.assert_allclose(found["prob_normal"] + found["prob_atypical"], 1.0, atol=1e-5)
    assert (found["score"] >= spec.postprocess["threshold"]).all()
    match = match_points(np.asarray(truth, float), found[["y", "x"]].to_numpy(), 7.5 / 0.25)
    assert match["tp"] >= 2, found[["y", "x", "score", "class"]]


def test_evaluate_mitosis_runs_on_a_few_held_out_crops(shared_data, tmp_path):
    """``evaluate mitosis`` end to end (mosaics + crop by crop) on 4 crops of 2 held-out slides:
    the code path the model card's numbers come from, which no other test runs."""
    import shutil

    import pandas as pd

    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train.evaluate_mitosis import evaluate_mitosis

    folder = resolve_model("mitosis", None)
    test_slides = load_spec(folder).extra["validation_slides"]["test"][:2]
    src = shared_data / "mitosis_ami_br"
    table = pd.read_csv(src / "crops.csv")
    keys = table["dataset"].astype(str) + "/" + table["slide"].astype(str)
    subset = table[keys.isin(test_slides)].sort_values("file").groupby("slide").head(2)
    assert len(subset) == 4
    for f in subset["file"]:
        (tmp_path / "d" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f, tmp_path / "d" / f)
    subset.to_csv(tmp_path / "d" / "crops.csv", index=False)
    m = evaluate_mitosis(folder, tmp_path / "d", canvas=512, per_mosaic=2, tissue=False,
                         workdir=tmp_path / "work", threads=1)
    crops = m["crops"]
    assert crops["n_crops"] == 4  # n_slides counts the spec's whole test split
    assert crops["detection"]["tp"] + crops["detection"]["fn"] == 4
    assert crops["detection"]["recall"] >= 0.75  # the card: 0.978 over 135 held-out crops
    det = m["detection"]["detection"]
    assert det["tp"] + det["fn"] == 4 and det["recall"] >= 0.75
