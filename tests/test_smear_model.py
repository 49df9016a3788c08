"""The bundled smear cell model on a held-out BCCD field, through the real runtime path (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.metrics import box_iou
from napari_hemato.models.registry import BUNDLED
from napari_hemato.train.data_smear import BCCD_MPP, parse_voc, read_split

MODEL = BUNDLED / "smear"
#: a validation field (never trained on) with one neutrophil and many red cells
STEM = "BloodImage_00000"



def test_box_matching_is_one_to_one():
    from napari_hemato.core.metrics import match_boxes
    from napari_hemato.train.data_smear import Box
    from napari_hemato.train.evaluate_smear import score_image

    gt = np.array([[0, 0, 10, 10], [0, 8, 10, 18]])
    pred = np.array([[0, 1, 10, 11], [0, 2, 10, 12], [0, 9, 10, 19]])
    tp, fp, fn, matched = match_boxes(gt, pred)
    assert (tp, fp, fn) == (2, 1, 0) and matched.tolist() == [True, False, True]
    boxes = [Box("RBC", 0, 0, 10, 10), Box("WBC", 20, 20, 40, 40)]
    s = score_image(boxes, np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 40, 40]]),
                    np.array(["RBC", "RBC", "WBC"]))
    assert s["RBC"] == {"tp": 1, "fp": 1, "fn": 0, "n_pred": 2, "n_gt": 1}
    assert s["RBC_annotated_regions"]["fp"] == 0  # the extra RBC lies where nothing is annotated
    assert s["WBC"]["tp"] == 1 and s["Platelets"]["n_pred"] == 0


@pytest.fixture(scope="module")
def result(shared_data, tmp_path_factory):
    from napari_hemato.api import analyze

    if not (MODEL / "model.onnx").exists():
        pytest.skip("bundled smear model not present")

    bccd = shared_data / "bccd"
    assert STEM in read_split(bccd, "val")
    out = tmp_path_factory.mktemp("smear") / "result.zarr"
    return analyze(bccd / "JPEGImages" / f"{STEM}.jpg", task="smear", model=MODEL, mpp=BCCD_MPP,
                   out=out, threads=2)


@pytest.mark.shared_data
def test_wbc_found_and_red_cells_counted(result, shared_data):
    table = result.table()
    _, boxes = parse_voc(shared_data / "bccd" / "Annotations" / f"{STEM}.xml")
    wbc_gt = np.array([b.yxyx for b in boxes if b.cls == "WBC"])
    wbc = table[table["cell_type"] == "WBC"]  # with the WBC stage, "class" holds the subtype
    assert len(wbc_gt) == 1 and len(wbc) >= 1
    assert set(wbc["class"]) <= {"SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT"}
    pred = wbc[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]].to_numpy(float)
    assert box_iou(wbc_gt, pred).max() >= 0.5
    assert (table["cell_type"] == "RBC").sum() >= 20  # 19 annotated, more visible


@pytest.mark.shared_data
def test_table_probabilities_and_labels(result):
    table = result.table()
    cols = ["prob_RBC", "prob_WBC", "prob_Platelets"]
    assert set(cols) <= set(table.columns)
    assert np.allclose(table[cols].sum(axis=1), 1.0, atol=1e-3)
    other = table[table["cell_type"] != "WBC"]
    assert (other["confidence"] == other[cols].max(axis=1)).all()
    assert (other["class"] == other["cell_type"]).all()
    wbc = table[table["cell_type"] == "WBC"]
    sub = [f"prob_{c}" for c in ("SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT")]
    np.testing.assert_allclose(wbc["confidence"], wbc[sub].max(axis=1), rtol=1e-6)
    labels = np.asarray(result.labels())
    assert labels.shape == (240, 320)  # work grid at 0.16 µm/px
    assert len(np.setdiff1d(np.unique(labels), [0])) == len(table)


@pytest.mark.shared_data
def test_held_out_box_f1_on_the_first_validation_fields(shared_data):
    """A quality floor for the bundled model (model card: WBC F1 0.99 on all 87 val fields)."""
    from napari_hemato.train.evaluate_smear import evaluate_smear

    if not (MODEL / "model.onnx").exists():
        pytest.skip("bundled smear model not present")
    m = evaluate_smear(MODEL, shared_data / "bccd", split="val", limit=10, threads=2)
    assert m["n_images"] == 10
    assert m["per_class"]["WBC"]["f1"] >= 0.9
    assert m["per_class"]["Platelets"]["recall"] >= 0.6
    assert m["rbc_annotated_regions"]["recall"] >= 0.75  # 0.81 on these 10, 0.93 on all 87


@pytest.mark.shared_data
def test_a_field_without_pixel_size_is_read_at_the_training_images_scale(result, shared_data, tmp_path):
    """A JPEG states no µm/px: without the red-cell estimate the smear spec's
    ``assumed_input_mpp`` (BCCD's 0.08) is used, not the model's own 0.16 (at which every cell
    would look twice too big and fall apart)."""
    from napari_hemato.api import analyze
    from napari_hemato.core.spec import load_spec

    assert load_spec(MODEL).assumed_input_mpp == BCCD_MPP
    bare = analyze(shared_data / "bccd" / "JPEGImages" / f"{STEM}.jpg", task="smear", model=MODEL,
                   out=tmp_path / "bare.zarr", threads=2, estimate_mpp=False)
    assert bare.grid.mpp_assumed and bare.grid.mpp0 == BCCD_MPP and bare.grid.factor == 2.0
    a, b = bare.table(), result.table()
    assert len(a) == len(b) and (a["cell_type"].value_counts() == b["cell_type"].value_counts()).all()
