"""Smear training code: pseudo-masks, a few training steps, ONNX export (needs torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hemato.train import data_smear as ds

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


def test_pseudo_masks_split_overlapping_boxes_and_keep_box_extent():
    boxes = [ds.Box("RBC", 10, 10, 40, 40), ds.Box("RBC", 10, 30, 40, 60),
             ds.Box("Platelets", 50, 50, 58, 58)]
    labels, classes = ds.pseudo_masks(boxes, (64, 80), None)
    assert classes.tolist() == [-1, 0, 0, 2]
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    ys, xs = np.nonzero(labels == 1)
    assert ys.min() >= 10 and ys.max() < 40 and xs.min() >= 10
    assert xs.max() < 36  # the overlap is shared, not swallowed
    ys, xs = np.nonzero(labels == 3)
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (50, 50, 58, 58)
    dist = ds.distance_target(labels)
    assert dist.max() == pytest.approx(1.0) and dist[labels == 0].max() == 0


def test_box_cut_by_the_border_is_completed():
    box = ds.complete_box(ds.Box("RBC", 0, 20, 20, 70), (100, 100), 0.16)
    assert box.y0 == pytest.approx(-30) and box.y1 == 20  # square again, outside the image
    labels, _ = ds.pseudo_masks([ds.Box("RBC", 0, 20, 20, 70)], (100, 100), None)
    assert labels[0, 45] == 1  # the mask reaches the border, not a shrunken ellipse


def test_export_layout_is_read(tmp_path):
    import pandas as pd
    import tifffile
    from skimage.io import imsave

    img = np.full((40, 60, 3), 220, np.uint8)
    lab = np.zeros((40, 60), np.uint32)
    lab[5:20, 5:20], lab[22:35, 30:50] = 7, 9
    img[lab > 0] = (180, 120, 130)
    imsave(tmp_path / "f1.png", img, check_contrast=False)
    tifffile.imwrite(tmp_path / "f1_label.tif", lab)
    pd.DataFrame({"id": [7, 9], "class": ["RBC", "unknown"]}).to_csv(tmp_path / "f1.csv", index=False)
    [path] = ds.list_export_stems(tmp_path)
    s = ds.load_export_sample(path, default_mpp=0.16, mpp=0.16)
    assert s.labels.shape == (40, 60)
    assert s.targets["cls"][10, 10] == 0 and s.targets["w"][10, 10] == 1
    assert s.labels[28, 40] == 0 and s.targets["w"][28, 40] == 0  # unknown class: ignored


@pytest.mark.shared_data
@pytest.mark.slow
def test_train_steps_export_and_onnx_matches_torch(shared_data, tmp_path):
    import onnxruntime as ort

    from napari_hemato.core.spec import load_spec
    from napari_hemato.train import smear
    from napari_hemato.train.common import normalize

    bccd = shared_data / "bccd"
    stems = ds.read_split(bccd, "train")[:2]
    samples = ds.load_bccd(bccd, stems, mpp=0.32)  # downscaled ×4: 160 × 120 px
    assert all(s.image.shape == (120, 160, 3) for s in samples)
    assert all((s.classes[1:] >= 0).all() and s.labels.max() > 0 for s in samples)
    torch.manual_seed(0)
    net = smear.build_net(widths=(8, 8, 16, 16, 16), head_channels=4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    sampler = smear.CropSampler(samples, crop=64)
    cw = smear.class_weights(samples)
    color = smear.ColorAugment()
    losses = []
    for _ in range(3):
        x, maps, cls = sampler.batch(2, rng)
        assert x.shape == (2, 3, 64, 64) and maps.shape == (2, 3, 64, 64) and cls.shape == (2, 64, 64)
        x = normalize(color(smear.hue_jitter(x, rng), rng), smear.NORMALIZATION)
        out = smear.loss_fn(net(x), maps, cls, cw)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(np.isfinite(losses))

    smear.export_model(net, tmp_path, check_images=[samples[0].image], extra={"test": True})
    try:  # three steps find no red cells: the probe is refused, model.json left valid
        probe = smear.add_red_cell_probe(tmp_path, bccd, fields=2, threads=1)
        assert probe["reference_diameter_um"] > 0
    except ValueError as err:
        assert "red cells" in str(err)
    spec = load_spec(tmp_path)
    assert spec.task == "smear" and spec.class_names == ("RBC", "WBC", "Platelets")
    assert set(spec.outputs) == {"foreground", "distance", "class_probs"}
    assert json.loads((tmp_path / "model.json").read_text())["extra"]["onnx_max_abs_diff"] < 1e-4

    x = spec.normalize(samples[1].image[None, :96, :128])
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(list(spec.outputs.values()), {"image": x})
    net.eval()
    with torch.no_grad():
        ref = smear.SmearOutputs(net)(torch.from_numpy(x))
    for g, r in zip(got, ref, strict=True):
        assert g.shape == tuple(r.shape)
        assert np.abs(g - r.numpy()).max() < 1e-4
    assert np.allclose(got[2].sum(axis=1), 1.0, atol=1e-5)
