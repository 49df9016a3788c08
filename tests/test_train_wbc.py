"""Training smoke test for the WBC classifier: a few steps, ONNX export, spec, ORT ≈ torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("onnx")


def _write_manifest_dataset(folder, size=64, per_class=2, seed=0):
    """Synthetic single-cell images (one violet disc on a cream background) + manifest.csv."""
    from PIL import Image

    from napari_hemato.models.cell_classifier import CLASS_NAMES

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = ["path,class,split,slide"]
    for k, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True)
        for j in range(per_class):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = (250, 226, 202)
            r = size * (0.15 + 0.015 * k)
            disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2
            img[disc] = (90 + 10 * k, 40 + 5 * j, 150)
            img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
            rel = f"{name}/{name}_{j}.png"
            Image.fromarray(img).save(folder / rel)
            rows.append(f"{rel},{name},{'val' if j == 1 else 'train'},slide{j}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_list_samples_and_split_manifest(tmp_path):
    from napari_hemato.train.data_wbc import assign_split, list_samples

    _write_manifest_dataset(tmp_path)
    df = list_samples(tmp_path)
    assert len(df) == 22 and df["label"].nunique() == 11
    out, rule = assign_split(df)
    assert (out["split"] == "val").sum() == 11
    assert "manifest" in rule


def test_stratified_split_is_seeded(tmp_path):
    import pandas as pd

    from napari_hemato.train.data_wbc import assign_split

    df = pd.DataFrame({"path": [f"SNE/{i}.jpg" for i in range(40)] + [f"PMY/{i}.jpg" for i in range(20)],
                       "class": ["SNE"] * 40 + ["PMY"] * 20, "split": None, "slide": None})
    a, _ = assign_split(df, val_fraction=0.15, seed=3)
    b, _ = assign_split(df, val_fraction=0.15, seed=3)
    assert a["split"].tolist() == b["split"].tolist()
    assert a.groupby("class")["split"].apply(lambda s: int((s == "val").sum())).to_dict() == {"PMY": 3, "SNE": 6}


def test_train_export_roundtrip(tmp_path):
    import onnxruntime as ort

    from napari_hemato.core.spec import load_spec
    from napari_hemato.train import wbc

    data, out = tmp_path / "data", tmp_path / "model"
    _write_manifest_dataset(data)
    code = wbc.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
                     "--batch-size", "4", "--input-size", "64", "--no-pretrained", "--threads", "1"])
    assert code == 0
    spec = load_spec(out)
    assert spec.kind == "classifier" and spec.task == "wbc" and spec.input_size == 64
    assert list(spec.class_names) == ["SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT"]
    assert spec.outputs == {"probs": "probs", "cam": "cam"}
    assert len(spec.extra["split"]["validation_files"]) == 11
    assert json.loads((out / "history.json").read_text())["epochs"][0]["epoch"] == 0

    # onnxruntime ≈ torch, on the checkpoint's weights
    net = wbc.build_model(size=64, pretrained=False)
    from napari_hemato.train.checkpoint import load_weights

    net.load_state_dict(load_weights(out / "checkpoint.safetensors"))
    x = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        ref_p, ref_c = wbc.ExportNet(net.eval())(wbc.normalize(x))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got_p, got_c = sess.run(["probs", "cam"], {"image": spec.normalize(x)})
    assert got_p.shape == (3, 11) and got_c.shape[:2] == (3, 11)
    np.testing.assert_allclose(got_p, ref_p.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got_c, ref_c.numpy(), atol=1e-3)

    # the runtime classifier runs on the exported model
    from napari_hemato.models.cell_classifier import CellClassifier

    crops = [np.full((50, 70, 3), 250, np.uint8), np.full((64, 64, 3), 200, np.uint8)]
    probs, cams = CellClassifier(out).classify_crops(crops, [30.0, None])
    assert probs.shape == (2, 11)
    assert [c.shape for c in cams] == [(50, 70), (64, 64)]

    # resume continues from the checkpoint without retraining epoch 1
    code = wbc.main(["--data", str(data), "--out", str(out), "--epochs", "2", "--steps-per-epoch", "1",
                     "--batch-size", "4", "--input-size", "64", "--no-pretrained", "--resume", "--no-export", "--threads", "1"])
    assert code == 0
    hist = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1]
    assert hist["epochs"][1]["steps"] == 1 and hist["stages"][0]["resumed_at_epoch"] == 1

    # --init-from takes the checkpoint's weights: zero epochs export exactly the checkpoint's net
    code = wbc.main(["--data", str(data), "--out", str(tmp_path / "init"), "--epochs", "0",
                     "--batch-size", "4", "--input-size", "64", "--no-pretrained", "--threads", "1",
                     "--init-from", str(out / "checkpoint.safetensors")])
    assert code == 0
    assert load_spec(tmp_path / "init").extra["training"]["init_from"].endswith("checkpoint.safetensors")
    net.load_state_dict(load_weights(out))  # the folder works too: the resumed run's last weights
    with torch.no_grad():
        ref_p, _ = wbc.ExportNet(net.eval())(wbc.normalize(x))
    sess = ort.InferenceSession(str(tmp_path / "init" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probs"], {"image": spec.normalize(x)})[0], ref_p.numpy(), atol=1e-5)


def test_manifest_area_gives_crop_diameter(tmp_path):
    """Exported crops: ``area_px`` is in level-0 pixels; crops may be resized (crop box → scale)."""
    from PIL import Image

    from napari_hemato.train.data_wbc import CellImages, list_samples

    (tmp_path / "LY").mkdir()
    Image.fromarray(np.full((60, 60, 3), 240, np.uint8)).save(tmp_path / "LY" / "a.png")
    area = np.pi * 40.0**2  # diameter 80 level-0 px, crop 120 level-0 px wide resized to 60 px
    (tmp_path / "manifest.csv").write_text(
        "path,class,id,slide,split,crop_y0,crop_x0,crop_y1,crop_x1,area_px\n"
        f"LY/a.png,LY,1,s1,train,0,0,120,120,{area}\n"
    )
    df = list_samples(tmp_path)
    assert df.loc[0, "diameter_px"] == pytest.approx(80.0) and df.loc[0, "crop_side"] == 120
    data = CellImages(df, tmp_path)
    assert data.diameter[0] == pytest.approx(40.0)
    assert (data.cy[0], data.cx[0]) == (29.5, 29.5)


def _write_coarse_fields(folder, n_fields=4, size=96):
    """Grey-cyan 'other lab' fields with two violet cells each + a coarse-label CSV."""
    from PIL import Image

    folder.mkdir()
    yy, xx = np.mgrid[:size, :size]
    rows = ["image,split,bbox_y0,bbox_x0,bbox_y1,bbox_x1,group"]
    for f in range(n_fields):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = (208, 212, 206)
        for (cy, cx), group in (((30, 30), "NEU"), ((66, 62), "LY" if f % 2 else "?")):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 14**2] = (150, 130, 200)
            rows.append(f"field{f},{'val' if f == 0 else 'train'},{cy - 14},{cx - 14},{cy + 14},{cx + 14},{group}")
        Image.fromarray(img).save(folder / f"field{f}.jpg")
    (folder / "groups.csv").write_text("\n".join(rows) + "\n")
    return folder / "groups.csv"


def test_coarse_labels_partial_loss_and_colour_standardisation(tmp_path):
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.cell_classifier import CellClassifier
    from napari_hemato.train import wbc
    from napari_hemato.train.data_coarse import FieldCells, group_mask

    # the partial-label loss only cares about the mass inside the group
    allowed = torch.from_numpy(group_mask(["NEU"]))
    z = torch.zeros(1, 11)
    z[0, 0], z[0, 1] = 10.0, 10.0  # all mass on SNE + BNE, split evenly
    assert float(wbc.group_nll(z, allowed)) < 1e-3
    z2 = torch.zeros(1, 11)
    z2[0, 4] = 10.0  # mass on LY
    assert float(wbc.group_nll(z2, allowed)) > 9.0
    probs = torch.softmax(torch.cat([z, z2]), 1).numpy()
    assert wbc.coarse_accuracy(probs, group_mask(["NEU", "NEU"])) == 0.5

    data, out = tmp_path / "data", tmp_path / "model"
    _write_manifest_dataset(data)
    csv = _write_coarse_fields(tmp_path / "fields")
    cells = FieldCells(csv, tmp_path / "fields", split="train")
    assert len(cells) == 5 and set(cells.groups) == {"NEU", "LY"}  # fields 1-3; '?' skipped
    code = wbc.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
                     "--batch-size", "4", "--input-size", "64", "--no-pretrained", "--threads", "1",
                     "--coarse-labels", str(csv), "--coarse-images", str(tmp_path / "fields"),
                     "--coarse-batch", "2"])
    assert code == 0
    row = json.loads((out / "history.json").read_text())["epochs"][0]
    assert row["coarse_loss"] > 0 and 0 <= row["val_coarse_group_acc"] <= 1
    spec = load_spec(out)
    assert spec.preprocess["colour"] == "od-standardize"
    assert spec.extra["training"]["coarse"]["n_train"] == len(cells)
    # the runtime applies the spec's colour standardisation: a cream-background and a
    # grey-background copy of the same cell give (nearly) the same input, hence the same output
    cell = np.full((64, 64, 3), (250, 226, 202), np.uint8)
    cell[20:44, 20:44] = (120, 60, 150)
    grey = np.clip(cell.astype(float) * (208 / 250, 212 / 226, 206 / 202), 0, 255).astype(np.uint8)
    p, _ = CellClassifier(out).classify_crops([cell, grey], [30.0, 30.0])
    np.testing.assert_allclose(p[0], p[1], atol=0.02)


def test_red_cell_scale_training_records_its_physical_window(tmp_path):
    """``--scale red-cell``: the ruler reads every training image, windows are window_um wide
    at the pooled reading, and the spec tells the runtime to do the same."""
    import pandas as pd
    from PIL import Image

    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.cell_classifier import CLASS_NAMES, CellClassifier
    from napari_hemato.train import wbc
    from tests.test_red_cell_scale import _smear

    data, out = tmp_path / "data", tmp_path / "model"
    rows = ["path,class,split,slide"]
    for k, name in enumerate(CLASS_NAMES):
        (data / name).mkdir(parents=True)
        for j in range(2):
            img = _smear((128, 128), 20.0, wbc=30 + 2 * k, seed=k * 2 + j)
            Image.fromarray(img).save(data / name / f"{name}_{j}.png")
            rows.append(f"{name}/{name}_{j}.png,{name},{'val' if j else 'train'},slide{j}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    assert wbc.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch-size", "4", "--input-size", "32", "--no-pretrained", "--threads", "1",
                     "--scale", "red-cell", "--window-um", "20"]) == 0
    pre = load_spec(out).preprocess
    assert pre["scale"] == "red-cell" and pre["window_um"] == 20.0 and pre["rbc_um"] == 7.5
    readings = pd.read_csv(out / "ruler_train.csv")["mpp"]
    assert readings.notna().all() and abs(readings.median() - 7.5 / 20.0) < 0.04  # 20 px red cells
    clf = CellClassifier(out, threads=1)
    assert clf.scale.mode == "red-cell"
    probs, _ = clf.classify_crops([_smear((128, 128), 20.0, wbc=40)])
    assert probs.shape == (1, 11) and clf.scale.sources["red-cell"] == 1
