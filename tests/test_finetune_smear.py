"""``finetune smear``: the smear cell detector's last layer refit on corrected fields (no torch).

The lab of these tests draws every cell 0.4 µm wider than the bundled model does (on the
bundled sample field); the refit must learn it, keep the reference fields shipped in the
replay within a point, and write a model folder ``analyze`` takes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from onnx import TensorProto, helper
from skimage.segmentation import expand_labels

from napari_hemato.api import analyze
from napari_hemato.core.annotations import from_result
from napari_hemato.core.errors import HematoError
from napari_hemato.core.export.formats import export_annotations
from napari_hemato.finetune import finetune, onnx_edit
from napari_hemato.finetune import smear as fs
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.finetune.smear_replay import load_smear_replay
from napari_hemato.models.registry import bundled_models
from napari_hemato.samples import sample_path

MPP = 0.08
WIDER_UM = 0.4


@pytest.fixture(scope="module")
def base() -> Path:
    return bundled_models()["smear"]


def analysed(model, out: Path):
    return analyze(sample_path("smear_field"), task="smear", model=model, mpp=MPP, out=out, threads=1,
                   classifier=False)


def mean_area(labels: np.ndarray) -> float:
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    return float(counts[counts > 0].mean())


@pytest.fixture(scope="module")
def corrected(base, tmp_path_factory) -> tuple[Path, float]:
    """The sample field analysed by the bundled model, every cell drawn 0.4 µm wider, exported
    as a label TIFF with its image. Returns (export folder, the model's mean cell area)."""
    tmp = tmp_path_factory.mktemp("corrected")
    ann = from_result(analysed(base, tmp / "run.zarr"))
    area = mean_area(ann.labels)
    ann.labels = expand_labels(np.asarray(ann.labels), WIDER_UM / MPP).astype(np.uint32)
    export_annotations(ann, tmp / "exports", ["tiff"], name="field")
    return tmp / "exports", area


def test_the_bundled_model_exposes_features_class_maps_and_its_replay(base):
    feats = SegmenterFeatures.load(base, threads=1)
    assert feats.dim == 12 and (feats.class_head.start, feats.class_head.end) == (2, 5)
    replay = load_smear_replay(base, feats.run, feats.spec.class_names)  # the probe matches the trunk
    fields = replay["fields"]
    assert len(fields) == 44 and all(f.image.shape[2] == 3 and len(f.boxes) == len(f.classes) for f in fields)
    assert {"RBC", "WBC", "Platelets"} <= set(np.concatenate([f.classes for f in fields]))
    scores = fs.reference_scores(fs.Heads(feats.init, feats.init_classes), fs.reference_grids(replay, feats),
                                 feats.spec)
    # the shipped layer on its reference fields, as `evaluate smear` measures the even half (0.859)
    assert scores["reference_objective"] > 0.84 and scores["reference_WBC_f1"] > 0.95
    assert (base / "replay.npz").stat().st_size < 3e6


def test_the_shipped_head_reproduces_the_models_maps(base):
    feats = SegmenterFeatures.load(base, threads=1)
    image = np.random.default_rng(1).integers(60, 250, (64, 96, 3)).astype(np.uint8)
    out = feats.predictor.predict(image[None], roles=["foreground", "distance", "class_probs"])
    f = feats.run(image)
    fg, dist = SegmenterFeatures.maps(f, feats.init)
    np.testing.assert_allclose(fg, out["foreground"][0, 0], atol=1e-5)
    np.testing.assert_allclose(dist, out["distance"][0, 0], atol=1e-5)
    np.testing.assert_allclose(SegmenterFeatures.class_maps(f, feats.init_classes), out["class_probs"][0], atol=1e-5)


def _conv_softmax_graph() -> object:
    """Conv 1×1 (4 → 5 channels) → Slice channels 2:5 → Softmax(axis=1)."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [5, 4, 1, 1], rng.normal(size=20).tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [5], rng.normal(size=5).tolist())]
    for name, v in (("s", 2), ("e", 5), ("a", 1)):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [1], [v]))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"]),
             helper.make_node("Slice", ["y", "s", "e", "a"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["class_probs"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("class_probs", TensorProto.FLOAT, [1, 3, 8, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_class_head_is_found_behind_a_softmax_or_its_elementwise_form():
    model = _conv_softmax_graph()
    plain = onnx_edit.find_class_maps_head(model)
    assert (plain.weight, plain.start, plain.end, plain.features) == ("w", 2, 5, "x")
    assert onnx_edit.elementwise_softmax(model) == 1
    assert onnx_edit.find_class_maps_head(model) == plain


def test_an_objects_class_is_its_cell_type():
    table = pd.DataFrame({"id": [1, 2, 3, 4, 5], "cell_type": ["WBC", "RBC", "Platelets", "nan", "nan"]})
    region = SimpleNamespace(classes={1: "SNE", 2: "RBC", 3: "Platelets", 4: "LY", 5: "artefact"}, table=table)
    classes, left_out = fs.object_classes(region, ("RBC", "WBC", "Platelets"))
    assert classes == {1: 1, 2: 0, 3: 2, 4: 1} and left_out == ["artefact"]
    # without a cell_type column: a white-cell subtype is a WBC, the classifier's PLT a platelet
    region = SimpleNamespace(classes={1: "MO", 2: "PLT", 3: "RBC"}, table=table.drop(columns="cell_type").iloc[:3])
    assert fs.object_classes(region, ("RBC", "WBC", "Platelets"))[0] == {1: 1, 2: 2, 3: 0}


def test_the_refit_learns_the_labs_wider_cells_and_keeps_the_reference(base, corrected, tmp_path):
    exports, area_before = corrected
    steps = []
    from napari_hemato.finetune.common import Progress

    result = finetune("smear", [exports], tmp_path / "m", base=base, threads=1,
                      progress=Progress(lambda s, f: steps.append((s, f))))
    before, after = result.metrics["before"], result.metrics["after"]
    assert "note" not in after, after
    assert after["heldout_score_of_the_split_fit"] > before["heldout_score"]
    assert after["reference_objective"] >= before["reference_objective"] - fs.MAX_REFERENCE_DROP
    assert result.corrections["regions"] == 1 and result.corrections["per_class"]["RBC"] > 50
    assert steps[0] == ("reading the corrections", 0.0) and steps[-1] == ("done", 1.0)
    folder = result.folder
    assert '"hemato-smear-cells-finetuned"' in (folder / "model.json").read_text()
    card = (folder / "MODEL_CARD.md").read_text()
    assert (folder / "replay.npz").is_file() and "exported field(s)" in card and "reference objective" in card
    assert (folder / "LICENSE-BCCD").is_file()  # the replay's BCCD fields keep their licence
    # the new model draws wider cells where the base drew them (by as much as the reference
    # fields allow: their boxes are BCCD's, drawn tight)
    labels = from_result(analysed(folder, tmp_path / "run.zarr")).labels
    assert mean_area(labels) > area_before


def test_bad_input_is_a_clear_error(base, corrected, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HematoError, match="no exported cells"):
        finetune("smear", [empty], tmp_path / "m", base=base, threads=1)
    with pytest.raises(HematoError, match="not a smear cell detector"):
        finetune("smear", [corrected[0]], tmp_path / "m", base=bundled_models()["nuclei"], threads=1)
    assert not (tmp_path / "m").exists()


def test_the_cli_writes_a_model_analyze_takes(base, corrected, tmp_path, capsys):
    from napari_hemato.cli import main

    assert main(["finetune", "smear", "--data", str(corrected[0]), "--out", str(tmp_path / "m"),
                 "--threads", "1", "--max-minutes", "0.1"]) == 0
    printed = capsys.readouterr()
    assert "cells in 1 corrected field(s)" in printed.out and "reference objective" in printed.out
    assert "analyze FIELD --task smear --model" in printed.out
    assert main(["analyze", str(sample_path("smear_field")), "--task", "smear", "--model", str(tmp_path / "m"),
                 "--mpp", str(MPP), "--out", str(tmp_path / "run.zarr"), "--no-classifier"]) == 0


def test_the_replay_is_rebuilt_from_bccd(base, shared_data, tmp_path):
    """``train.smear_replay`` (no torch) on a copy of the bundled folder gives the shipped replay's
    reference fields and boxes, and a probe that matches the trunk."""
    import shutil

    from napari_hemato.train.smear_replay import build_replay

    folder = tmp_path / "smear"
    shutil.copytree(base, folder)
    (folder / "replay.npz").unlink()
    build_replay(folder, shared_data / "bccd", per_image=8, threads=1, max_train_fields=10)
    feats = SegmenterFeatures.load(folder, threads=1)
    replay = load_smear_replay(folder, feats.run, feats.spec.class_names)
    assert replay["train_x"].shape[1] == 12 and len(replay["train_x"]) <= 8 * 10
    assert (folder / "LICENSE-BCCD").read_text().startswith("MIT License")
    with np.load(base / "replay.npz") as shipped:
        np.testing.assert_array_equal(np.load(folder / "replay.npz")["ref_boxes"], shipped["ref_boxes"])
        assert list(shipped["ref_keys"]) == [f.key for f in replay["fields"]]
