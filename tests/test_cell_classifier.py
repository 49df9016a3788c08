"""WBC classifier runtime (no torch): size normalisation, CAM mapping, bundled model on real PBC cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_hemato.models.cell_classifier import (
    CLASS_NAMES,
    CellClassifier,
    cam_to_crop,
    cell_window,
    estimate_cell_diameter,
    extract_window,
    normalize_cell,
)
from napari_hemato.models.registry import BUNDLED

WBC_DIR = BUNDLED / "wbc"
needs_model = pytest.mark.skipif(not (WBC_DIR / "model.onnx").is_file(), reason="bundled wbc model absent")


# -- pure functions ------------------------------------------------------------
def _disc_image(size=120, radius=25, center=None, bg=(250, 226, 202), fg=(90, 50, 150)):
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    cy, cx = center or ((size - 1) / 2, (size - 1) / 2)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = fg
    return img


def test_estimate_diameter_synthetic_scales_linearly():
    d1 = estimate_cell_diameter(_disc_image(120, 25))
    d2 = estimate_cell_diameter(_disc_image(240, 50))
    assert 47 < d1 < 54
    assert 1.9 < d2 / d1 < 2.1


def test_estimate_diameter_fallback_on_blank():
    assert estimate_cell_diameter(np.full((100, 60, 3), 255, np.uint8)) == pytest.approx(27.0)


def test_window_geometry_and_mirroring():
    assert cell_window((89.5, 90.5), 80, 1.5) == (30, 31, 120)
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    win = extract_window(img, -2, -2, 4)
    assert win.shape == (4, 4, 3)
    np.testing.assert_array_equal(win[2:, 2:], img[:2, :2])
    np.testing.assert_array_equal(win[1, 2:], img[0, :2])  # mirrored, not constant
    far = extract_window(img, 50, 50, 3)  # entirely outside: nearest pixels, still the right shape
    assert far.shape == (3, 3, 3)
    x, window = normalize_cell(np.zeros((180, 182, 3), np.uint8), (89.5, 90.5), 80, size=64)
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8 and window == (30, 31, 120)


def test_cam_to_crop_places_window():
    cam = np.zeros((4, 4), np.float32)
    cam[1:3, 1:3] = 2.0
    out = cam_to_crop(cam, (10, 20, 40), (60, 80))
    assert out.shape == (60, 80) and out.dtype == np.float32
    assert out.max() == pytest.approx(1.0) and out.min() >= 0
    assert out[:10].max() == 0 and out[:, :20].max() == 0 and out[50:].max() == 0
    assert out[30, 40] == pytest.approx(1.0)
    assert cam_to_crop(-np.ones((4, 4)), (0, 0, 8), (8, 8)).max() == 0


# -- a tiny ONNX classifier (no torch): the runtime plumbing -------------------------
def _tiny_classifier_dir(folder: Path, size: int = 32) -> Path:
    """probs = softmax(mean of cam); cam = 1x1 conv of a 4x4 average-pooled input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from napari_hemato.core.spec import ModelSpec

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (len(CLASS_NAMES), 3, 1, 1)).astype(np.float32)
    k = size // 4
    nodes = [
        helper.make_node("AveragePool", ["image"], ["feats"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Conv", ["feats", "w"], ["cam"]),
        helper.make_node("ReduceMean", ["cam"], ["logits"], axes=[2, 3], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wbc",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASS_NAMES)]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", len(CLASS_NAMES), 4, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    ModelSpec(name="tiny-wbc", version="0", task="wbc", kind="classifier", class_names=CLASS_NAMES,
              outputs={"probs": "probs", "cam": "cam"}, input_size=size,
              normalization={"mean": [0.5] * 3, "std": [0.5] * 3},
              preprocess={"context": 1.5}).save(folder)
    return folder


def test_tiny_model_crops_and_in_image_agree(tmp_path):
    pytest.importorskip("onnx")
    clf = CellClassifier(_tiny_classifier_dir(tmp_path / "tiny"), threads=1)
    cells = [_disc_image(90, 20, fg=(90, 50, 150)), _disc_image(90, 20, fg=(160, 60, 60))]
    probs, cams = clf.classify_crops(cells, [40.0, None])
    assert probs.shape == (2, 11) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [c.shape for c in cams] == [(90, 90), (90, 90)]
    assert all(0 <= c.min() and c.max() <= 1 for c in cams)

    canvas = np.full((300, 400, 3), (250, 226, 202), np.uint8)
    offsets = [(20, 30), (150, 250)]
    for (y, x), cell in zip(offsets, cells, strict=True):
        canvas[y : y + 90, x : x + 90] = cell
    diam = [40.0, estimate_cell_diameter(cells[1])]
    centers = np.array([[y + 44.5, x + 44.5] for y, x in offsets])
    p_img, cams_img = clf.classify_in_image(canvas, centers, diam)
    p_crop, _ = clf.classify_crops(cells, diam)
    np.testing.assert_allclose(p_img, p_crop, atol=1e-6)
    assert [c.shape for c in cams_img] == [(60, 60), (round(diam[1] * 1.5),) * 2]
    empty, none = clf.classify_crops([])
    assert empty.shape == (0, 11) and none == []
    with pytest.raises(ValueError):
        clf.classify_in_image(canvas, centers, [40.0])


# -- the bundled model on real PBC cells ---------------------------------------------
@pytest.fixture(scope="module")
def pbc_val(shared_data):
    """Two held-out images per class, as recorded in the bundled spec."""
    from napari_hemato.core.spec import load_spec
    from napari_hemato.train.data_wbc import load_rgb

    spec = load_spec(WBC_DIR)
    files = spec.extra["split"]["validation_files"]
    chosen = []
    for name in CLASS_NAMES:
        chosen += [f for f in files if f.split("/")[0] == name][:2]
    images = [load_rgb(shared_data / "pbc" / f) for f in chosen]
    labels = np.array([CLASS_NAMES.index(f.split("/")[0]) for f in chosen])
    return images, labels


@pytest.fixture(scope="module")
def bundled():
    return CellClassifier(threads=2)


@needs_model
def test_bundled_model_on_held_out_pbc(bundled, pbc_val):
    images, labels = pbc_val
    assert len(images) == 22
    probs, cams = bundled.classify_crops(images)
    assert probs.shape == (22, 11) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    for img, cam in zip(images, cams, strict=True):
        assert cam.shape == img.shape[:2] and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0
    assert (probs.argmax(1) == labels).mean() >= 0.8


@needs_model
def test_bundled_model_scale_invariance(bundled, pbc_val):
    from PIL import Image

    images, _ = pbc_val
    big = [np.asarray(Image.fromarray(im).resize((im.shape[1] * 2, im.shape[0] * 2), Image.Resampling.BICUBIC))
           for im in images]
    p1, _ = bundled.classify_crops(images)
    p2, cams2 = bundled.classify_crops(big)
    assert (p1.argmax(1) == p2.argmax(1)).mean() >= 0.75
    assert cams2[0].shape == big[0].shape[:2]


@needs_model
def test_bundled_classify_in_image_matches_crops(bundled, pbc_val):
    images, labels = pbc_val
    cells = [images[0], images[8]]  # two different classes (SNE, EO)
    canvas = np.full((420, 640, 3), (252, 228, 204), np.uint8)
    offsets = [(30, 40), (210, 400)]
    for (y, x), cell in zip(offsets, cells, strict=True):
        h, w = cell.shape[:2]
        canvas[y : y + h, x : x + w] = cell
    diam = [estimate_cell_diameter(c) for c in cells]
    centers = [[y + (c.shape[0] - 1) / 2, x + (c.shape[1] - 1) / 2] for (y, x), c in zip(offsets, cells, strict=True)]
    # a red-cell-scale model cuts window_um at a pixel size: the same one for both paths (the
    # canvas has no red cells between the pasted crops, so its own reading would differ)
    mpp = 0.22 if bundled.scale.mode == "red-cell" else None
    p_img, cams = bundled.classify_in_image(canvas, np.array(centers), np.array(diam), mpp=mpp)
    p_crop, _ = bundled.classify_crops(cells, mpp=mpp)
    assert p_img.argmax(1).tolist() == p_crop.argmax(1).tolist()
    np.testing.assert_allclose(p_img, p_crop, atol=1e-4)
    sides = [bundled.scale.side_from_mpp(mpp) if mpp else d * bundled.context for d in diam]
    assert [c.shape for c in cams] == [(round(s),) * 2 for s in sides]


def test_estimate_diameter_on_pbc(shared_data):
    from PIL import Image

    from napari_hemato.train.data_wbc import load_rgb

    files = []
    for name in ("SNE", "EO", "MO", "MY", "BA"):
        files += sorted((shared_data / "pbc" / name).glob("*.jpg"))[:4]
    d1, d2 = [], []
    for f in files:
        img = load_rgb(f)
        d1.append(estimate_cell_diameter(img))
        big = np.asarray(Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.Resampling.BICUBIC))
        d2.append(estimate_cell_diameter(big))
    d1, d2 = np.array(d1), np.array(d2)
    assert 55 <= np.median(d1) <= 100, d1
    assert ((d1 > 40) & (d1 < 120)).all(), d1
    assert 1.85 <= np.median(d2 / d1) <= 2.15


def test_colour_standardisation_removes_background_tint_and_stain_density():
    from napari_hemato.models.colour_standardize import (
        SCALE_LIMITS,
        apply_colour_mode,
        standardize_colour,
    )

    od_cell = np.array([0.5, 0.9, 0.4])  # a violet cell: optical density per channel
    yy, xx = np.mgrid[:64, :64]
    cell = (yy - 32) ** 2 + (xx - 32) ** 2 < 18**2

    def window(background, density):
        img = np.empty((64, 64, 3), np.float64)
        img[:] = background
        img[cell] = np.asarray(background) * np.exp(-density * od_cell)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    cream_dark = window((255, 229, 204), 1.0)  # CellaVision-like
    grey_pale = window((209, 211, 206), 0.5)  # BCCD-like: grey background, pale stain
    a, b = standardize_colour(np.stack([cream_dark, grey_pale]))
    assert (a[0, 0] == 255).all() and (b[0, 0] == 255).all()  # background -> white
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 3  # same cell after standardisation
    assert np.abs(cream_dark.astype(int) - grey_pale.astype(int)).max() > 40  # ...not before
    blank = np.full((16, 16, 3), 200, np.uint8)
    blank[8, 8] = 198  # almost no stain: the density factor is capped, not blown up
    out = standardize_colour(blank)
    assert out[8, 8].min() >= int(255 * np.exp(-SCALE_LIMITS[1] * np.log(200 / 198))) - 1
    assert apply_colour_mode(cream_dark, "none") is cream_dark
    with pytest.raises(ValueError, match="unknown colour mode"):
        apply_colour_mode(cream_dark, "macenko")


def test_colour_standardisation_of_a_batch_on_two_threads_is_window_by_window():
    from napari_hemato.models.colour_standardize import apply_colour_mode, standardize_colour

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (37, 48, 40, 3), dtype=np.uint8)
    alone = np.stack([standardize_colour(w) for w in batch])
    np.testing.assert_array_equal(apply_colour_mode(batch, "od-standardize"), alone)
