"""Mitosis training: a tiny run on synthetic crops, export, resume, and the data helpers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from napari_hemato.core.spec import load_spec
from tests.synthetic import fake_dsb_tissue


def _fake_crop(rng: np.random.Generator, atypical: bool) -> np.ndarray:
    """A pink 128-px crop with pale nuclei and a dark 'figure' at the centre."""
    img = np.empty((128, 128, 3), np.uint8)
    img[:] = (230, 170, 200)
    yy, xx = np.mgrid[:128, :128]
    for _ in range(6):
        y, x = rng.integers(10, 118, 2)
        img[(yy - y) ** 2 + (xx - x) ** 2 < 60] = (170, 120, 190)
    if atypical:
        for dy, dx in ((-8, -6), (6, 8), (8, -8)):
            img[(yy - 64 - dy) ** 2 + (xx - 64 - dx) ** 2 < 12] = (60, 30, 100)
    else:
        img[(np.abs(yy - 64) < 3) & (np.abs(xx - 64) < 10)] = (60, 30, 100)
    return img


def _tiny_dataset(root: Path, n_slides: int = 6, per_slide: int = 3) -> Path:
    """An AMi-Br-layout folder (crops.csv + normal/ + atypical/) of synthetic crops."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["slide,dataset,uid,x,y,expert1_label,expert2_label,majority_atypical,file"]
    uid = 0
    for s in range(n_slides):
        for _ in range(per_slide):
            atyp = bool(uid % 3 == 0)
            sub = "atypical" if atyp else "normal"
            (root / sub).mkdir(parents=True, exist_ok=True)
            name = f"{sub}/FAKE_{uid}.jpg"
            Image.fromarray(_fake_crop(rng, atyp)).save(root / name, quality=95)
            rows.append(f"s{s}.tif,FAKE,{uid},100,100,a,b,{atyp},{name}")
            uid += 1
    (root / "crops.csv").write_text("\n".join(rows) + "\n")
    return root


def test_split_is_by_slide_and_deterministic():
    from napari_hemato.train.data_mitosis import split_slides

    slides = [f"A/{i}" for i in range(20) for _ in range(2)] + [f"B/{i}" for i in range(10)]
    datasets = ["A"] * 40 + ["B"] * 10
    a = split_slides(slides, datasets)
    assert a == split_slides(slides, datasets)
    assert not set(a["train"]) & (set(a["tune"]) | set(a["test"]))
    assert set(a["train"]) | set(a["tune"]) | set(a["test"]) == set(slides)
    held = a["tune"] + a["test"]
    assert sum(s.startswith("A/") for s in held) == 4 and sum(s.startswith("B/") for s in held) == 2


def test_mosaic_places_every_crop_once():
    from napari_hemato.train.data_mitosis import Crops
    from napari_hemato.train.mosaics import make_mosaics

    rng = np.random.default_rng(1)
    n = 11
    crops = Crops(np.stack([_fake_crop(rng, False) for _ in range(n)]), np.full((n, 2), 64.0),
                  np.arange(n) % 2, np.array(["s"] * n, object), np.array(["d"] * n, object),
                  np.array([f"c{i}" for i in range(n)], object))
    tissue = [np.full((300, 300, 3), (200, 120, 170), np.uint8)]
    mosaics = make_mosaics(crops, tissue, size=512, per_mosaic=4, decoys=1, block=128)
    assert [len(m.points) for m in mosaics] == [4, 4, 3]
    names = np.concatenate([m.crop_names for m in mosaics])
    assert sorted(names) == sorted(crops.names)
    for m in mosaics:  # the dark figure is where the ground truth says
        for y, x in m.points.astype(int):
            assert m.image[y, x].sum() < 250


def test_tiny_training_exports_a_valid_model(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import onnxruntime as ort

    from napari_hemato.train.mitosis import MitosisOutputs, main, train_mitosis

    data = _tiny_dataset(tmp_path / "data")
    fake_dsb_tissue(data, n=4)  # negative tissue: 3 train tiles, one tune tile
    out = tmp_path / "model"
    kw = dict(steps_per_epoch=2, batch_size=4, widths=(8, 8, 16), threads=1, val_crops=4,
              mosaic_um=96.0)
    t0 = time.perf_counter()
    result = train_mitosis(data, out, epochs=1, seed=3, **kw)
    assert time.perf_counter() - t0 < 60
    assert (out / "checkpoint.safetensors").exists()
    split = result["split"]
    assert len(split["tune"]) == 1 and len(split["test"]) == 1 and len(split["train"]) == 4
    # the epoch was scored within the tune tissue's false-detection budget, and the exported
    # threshold is at least the budget's
    val = result["best"]["val"]
    assert val["budget"]["budget_per_mm2"] == 2.0 and val["budget"]["tissue_mm2"] > 0
    tissue = load_spec(out).extra["validation_tissue"]
    assert len(tissue["tune"]) == 1 and tissue["test"] == []
    # the threshold is then set on the tune slide's crops through the runtime (recall bound)
    record = load_spec(out).extra["threshold"]
    assert record == result["threshold"] and record["tune_crops"] == 3
    assert load_spec(out).postprocess["threshold"] == record["value"]
    assert "Wilson" in record["rule"] and record["previous"] >= round(val["budget"]["threshold"], 3)

    spec = load_spec(out)
    assert spec.task == "mitosis" and spec.kind == "points" and spec.mpp == 0.25
    assert spec.class_names == ("normal", "atypical")
    assert set(spec.outputs) == {"heatmap", "class_probs"}
    assert spec.size_divisor == 8 and spec.receptive_field_px > 0 and spec.pad_value == 255
    assert spec.extra["validation_slides"] == {"tune": split["tune"], "test": split["test"]}
    assert spec.postprocess["min_distance_um"] == 7.5

    # onnxruntime agrees with torch on real-looking input, batch of 2, non-square
    sess = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch = np.stack([_fake_crop(rng, False)[:48, :64], _fake_crop(rng, True)[40:88, 16:80]])
    x = spec.normalize(batch)
    heat, probs = sess.run(["heatmap", "class_probs"], {"image": x})
    assert heat.shape == (2, 1, 48, 64) and probs.shape == (2, 2, 48, 64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = MitosisOutputs(result["model"].eval())(torch.from_numpy(x))
    assert np.abs(ref[0].numpy() - heat).max() < 1e-4
    assert np.abs(ref[1].numpy() - probs).max() < 1e-4

    # resume continues from the checkpoint (the CLI path)
    argv = ["--data", str(data), "--out", str(out), "--epochs", "2", "--seed", "3", "--resume",
            "--threads", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--widths", "8,8,16",
            "--val-crops", "4", "--no-mine", "--arch", "small"]
    assert main(argv) == 0
    assert load_spec(out).extra["training"]["epochs_run"] == 2

    # the evaluation runs end to end through the engine (CLI: --model as for the other tasks)
    import json

    from napari_hemato.train.evaluate_mitosis import main as evaluate_main

    assert evaluate_main(["--model", str(out), "--data", str(data), "--canvas", "512",
                          "--per-mosaic", "2", "--no-tissue", "--threads", "1",
                          "--save", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["crops"]["n_crops"] == 3 and m["detection"]["n_crops"] == 3  # one test slide
    d = m["crops"]["detection"]
    assert d["tp"] + d["fn"] == 3 and 0.0 <= d["f1"] <= 1.0


def test_effnet_detector_trains_on_composed_canvases_and_exports_exactly(tmp_path):
    """The default architecture: ImageNet trunk (not loaded here), 2x2 canvases, ONNX == torch
    at a tile size other than the training size (static 'same' padding holds for multiples of 32)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    import onnxruntime as ort

    from napari_hemato.train import data_mitosis as dm
    from napari_hemato.train.mitosis import MitosisOutputs, Sampler, train_mitosis

    data = _tiny_dataset(tmp_path / "data")
    crops = dm.load_crops(dm.read_crops_table(data))
    sampler = Sampler(crops, [], 0.25, 32, compose=2)
    x, heat, mask, cls = sampler.batch(2, np.random.default_rng(0))
    assert x.shape == (2, 3, 192, 192) and heat.shape == (2, 1, 192, 192) and cls.shape == (2, 192, 192)
    assert (heat.amax(dim=(1, 2, 3)) > 0.9).all()  # every canvas holds at least one figure here

    result = train_mitosis(data, tmp_path / "model", epochs=1, seed=0, steps_per_epoch=1,
                           batch_size=2, threads=1, val_crops=4, mosaic_um=96.0, arch="effnet",
                           pretrained=False, mine=False)
    spec = load_spec(tmp_path / "model")
    assert spec.size_divisor == 32 and spec.extra["training"]["arch"] == "effnet"
    assert spec.normalization["mean"][0] == pytest.approx(127 / 255)
    sess = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    img = np.random.default_rng(1).integers(0, 256, (1, 96, 160, 3), dtype=np.uint8)
    h, p = sess.run(["heatmap", "class_probs"], {"image": spec.normalize(img)})
    with torch.no_grad():
        ref_h, ref_p = MitosisOutputs(result["model"].eval())(torch.from_numpy(spec.normalize(img)))
    assert h.shape == (1, 1, 96, 160)
    assert np.abs(ref_h.numpy() - h).max() < 1e-4 and np.abs(ref_p.numpy() - p).max() < 1e-4


def _region(key, group, shape):
    from napari_hemato.train import data_mitosis as dm

    src = dm.TissueSource(key, f"{key}.png", 0.25, "none", group=group)
    return dm.TissueRegion(src, (0, 0, *shape), np.zeros((*shape, 3), np.uint8), 0.25)


def test_tissue_groups_are_sampled_alike_whatever_their_tile_count():
    pytest.importorskip("torch")
    from napari_hemato.train.mitosis_batches import tissue_weights

    regions = [_region("big", "cmu", (400, 400))] + [_region(f"d{i}", "dsb", (100, 100)) for i in range(20)]
    w = tissue_weights(regions)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(0.5) and w[1:].sum() == pytest.approx(0.5)  # one group each half
    np.testing.assert_allclose(w[1:], w[1])  # by area within a group


def test_hard_negatives_are_shared_among_tissue_groups(monkeypatch):
    pytest.importorskip("torch")
    from napari_hemato.train import mitosis

    regions = [_region("a", "miccai", (64, 64)), _region("b", "dsb", (64, 64))]
    peaks = {0: [(10, 10, 0.5)], 1: [(y, x, 0.9) for y in (8, 40) for x in (8, 24, 40, 56)]}

    def fake_predict(net, img):  # region 0: one weak detection, region 1: eight strong ones
        r = next(i for i, reg in enumerate(regions) if reg.image is img)
        heat = np.zeros(img.shape[:2], np.float32)
        for y, x, s in peaks[r]:
            heat[y, x] = s
        return heat, None

    monkeypatch.setattr(mitosis, "dense_predict", fake_predict)
    hard = mitosis.mine_hard_negatives(None, regions, threshold=0.3, top=4)
    assert len(hard) == 4 and sum(r == 0 for r, _, _ in hard) == 1  # the weak group keeps its one
    assert sum(r == 1 for r, _, _ in hard) == 3  # ... and passes its unused share on


def test_eosin_cut_leaves_haematoxylin_alone():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from napari_hemato.train.augment import _HED_FROM_RGB, ColorAugment

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(60, 240, (1, 3, 16, 16))).float()
    aug = ColorAugment(hed_sigma=0.0, hed_shift=0.0, p_hed=1.0, p_bcs=0.0, p_blur=0.0,
                       p_jpeg=0.0, p_gray=0.0, p_eosin=1.0, eosin_range=(0.3, 0.3))

    def stains(t):
        od = -np.log(np.clip(t[0].numpy(), 1, 255) / 255.0)
        return np.einsum("chw,cd->dhw", od, _HED_FROM_RGB)

    before, after = stains(x), stains(aug(x, rng))
    inside = (after > -5).all(0) & (x[0].numpy() < 254).all(0)  # not clipped
    np.testing.assert_allclose(after[0][inside], before[0][inside], atol=1e-3)  # H unchanged
    np.testing.assert_allclose(after[1][inside], 0.3 * before[1][inside], atol=1e-3)  # E x 0.3
