"""The red-cell ruler and the physical ("red-cell") window scale of the WBC classifier."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_hemato.core.errors import ModelError
from napari_hemato.models.red_cell_ruler import estimate_red_cell_diameter
from napari_hemato.models.window_scale import WindowScale

BG, RBC, PALLOR, WBC = (250, 228, 200), (200, 150, 160), (228, 196, 184), (90, 50, 150)


def _smear(shape=(240, 260), d=30.0, *, wbc=None, seed=0, touching=False) -> np.ndarray:
    """Cream background, red-cell discs of diameter ``d`` (pale centres), optional central white cell."""
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), BG, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres, step = [], d * (1.0 if touching else 1.35)
    for cy in np.arange(d * 0.7, shape[0] - d * 0.7, step):
        for cx in np.arange(d * 0.7, shape[1] - d * 0.7, step):
            centres.append((cy + rng.uniform(-1, 1), cx + rng.uniform(-1, 1)))
    for cy, cx in centres:
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        img[r2 < (d / 2) ** 2] = RBC
        img[r2 < (d / 6) ** 2] = PALLOR
    if wbc:
        cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (wbc / 2) ** 2] = WBC
    return img


def _zoom(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("d", [24.0, 40.0, 64.0])
def test_ruler_on_synthetic_discs(d):
    est = estimate_red_cell_diameter(_smear((int(6 * d), int(6.5 * d)), d))
    assert est.ok and est.n_cells >= 4
    assert abs(est.diameter_px / d - 1) < 0.1


def test_ruler_counts_touching_cells_once_and_skips_the_white_cell():
    d = 32.0
    sep = estimate_red_cell_diameter(_smear(d=d))
    touch = estimate_red_cell_diameter(_smear(d=d, touching=True))
    assert touch.ok and abs(touch.diameter_px / d - 1) < 0.1  # h-maxima: one marker per disc
    assert touch.n_cells >= sep.n_cells * 0.8
    img = _smear(d=d, wbc=90)
    est = estimate_red_cell_diameter(img, exclude=[(119.5, 129.5, 90.0)])
    assert est.ok and abs(est.diameter_px / d - 1) < 0.1


def test_ruler_fails_without_red_cells():
    empty = np.full((100, 100, 3), BG, np.uint8)
    est = estimate_red_cell_diameter(empty)
    assert not est.ok and est.mpp() is None


def test_ruler_follows_the_image_scale():
    img = _smear(d=30.0, wbc=70)
    a, b = estimate_red_cell_diameter(img), estimate_red_cell_diameter(_zoom(img, 2.0))
    assert a.ok and b.ok and abs(b.diameter_px / a.diameter_px - 2) < 0.2


def test_window_side_follows_the_image_scale_in_red_cell_mode_only():
    img = _smear(d=30.0, wbc=70)
    big = _zoom(img, 2.0)
    red = WindowScale.from_preprocess({"scale": "red-cell", "window_um": 25.0, "context": 1.8})
    s1, s2 = red.sides([(img, 70.0), (big, 140.0)])
    assert abs(s2 / s1 - 2) < 0.2 and red.sources["red-cell"] == 2
    assert abs(s1 - 25.0 / (7.5 / 30.0)) < 0.1 * s1  # 25 µm at 7.5 µm per red cell of 30 px
    own = WindowScale.from_preprocess({"context": 1.5})  # an old spec: no "scale" key
    assert own.mode == "self" and own.as_preprocess() == {"context": 1.5}
    np.testing.assert_array_equal(own.sides([(img, 70.0), (big, 140.0)]), [105.0, 210.0])
    assert own.sides([(img, 70.0)], mpp=0.1)[0] == 105.0  # a self-scale model ignores mpp


def test_window_scale_sources_and_fallback():
    red = WindowScale.from_preprocess({"scale": "red-cell", "window_um": 24.0, "context": 1.8})
    empty = np.full((100, 100, 3), BG, np.uint8)
    sides = red.sides([(empty, 50.0), (None, 50.0), (None, 50.0)], mpp=[None, None, 0.2])
    np.testing.assert_allclose(sides, [90.0, 90.0, 120.0])
    assert dict(red.sources) == {"self-fallback": 2, "caller": 1}
    with pytest.raises(ValueError, match="window_um"):
        WindowScale.from_preprocess({"scale": "red-cell"})
    with pytest.raises(ValueError, match="unknown preprocess scale"):
        WindowScale.from_preprocess({"scale": "zoom"})


def _tiny(folder, preprocess):
    """The tiny ONNX classifier of test_cell_classifier with another ``preprocess``."""
    pytest.importorskip("onnx")
    import json

    from tests.test_cell_classifier import _tiny_classifier_dir

    folder = _tiny_classifier_dir(folder)
    raw = json.loads((folder / "model.json").read_text())
    raw["preprocess"] = preprocess
    (folder / "model.json").write_text(json.dumps(raw))
    return folder


def test_classifier_scale_modes(tmp_path):
    from napari_hemato.models.cell_classifier import CellClassifier

    old = CellClassifier(_tiny(tmp_path / "old", {"context": 1.5}), threads=1)
    field = _smear((300, 400), 30.0, wbc=70)
    centre = np.array([[149.5, 199.5]])
    _, cams = old.classify_in_image(field, centre, [70.0], mpp=0.1)
    assert old.scale.mode == "self" and cams[0].shape == (105, 105)  # diameter x context, mpp ignored

    red = CellClassifier(_tiny(tmp_path / "red", {"context": 1.8, "scale": "red-cell", "window_um": 25.0}),
                         threads=1)
    _, cams = red.classify_in_image(field, centre, [70.0], mpp=0.125)
    assert cams[0].shape == (200, 200)  # 25 µm / 0.125 µm per px
    _, cams = red.classify_in_image(field, centre, [70.0])  # the field's red cells: 30 px = 7.5 µm
    assert abs(cams[0].shape[0] - 100) <= 10 and red.scale.sources["red-cell"] == 1
    crop = field[60:240, 110:290]
    _, c1 = red.classify_crops([crop])
    _, c2 = red.classify_crops([_zoom(crop, 2.0)])
    assert c1[0].shape == crop.shape[:2] and c2[0].shape == (360, 360)
    with pytest.raises(ModelError, match="unknown preprocess scale"):
        CellClassifier(_tiny(tmp_path / "bad", {"context": 1.5, "scale": "zoom"}), threads=1)


def test_training_windows_use_the_physical_side():
    from napari_hemato.train.data_wbc import augmented_window

    img = _smear((200, 200), 30.0, wbc=70)
    rng = np.random.default_rng(0)
    x = augmented_window(img, (99.5, 99.5), 70.0, rng, size=32, context=1.8, side_px=100.0,
                         context_jitter=1.18, p_lowres=0.0)
    assert x.shape == (32, 32, 3)


def test_ruler_on_real_pbc_crops(shared_data):
    """PBC is one scanner: the red cells of different crops measure alike, and follow a rescale."""
    from napari_hemato.models.cell_windows import segment_center_cell
    from napari_hemato.train.data_wbc import load_rgb

    files = []
    for name in ("LY", "MO", "SNE", "PLT"):
        files += sorted((shared_data / "pbc" / name).glob("*.jpg"))[:3]
    est = []
    for f in files:
        img = load_rgb(f)
        d, (cy, cx) = segment_center_cell(img)
        e = estimate_red_cell_diameter(img, exclude=[(cy, cx, d)])
        e2 = estimate_red_cell_diameter(_zoom(img, 2.0), exclude=[(2 * cy, 2 * cx, 2 * d)])
        if e.ok and e2.ok:
            est.append((e.diameter_px, e2.diameter_px))
    est = np.array(est)
    assert len(est) >= 10
    assert 28 < np.median(est[:, 0]) < 40  # ~34 px in the 180 x 182 PBC images
    assert np.std(est[:, 0]) / np.mean(est[:, 0]) < 0.15
    assert abs(np.median(est[:, 1] / est[:, 0]) - 2) < 0.2


def test_smear_second_stage_gives_a_red_cell_classifier_the_stated_pixel_size():
    """classify_wbcs cuts the physical window and passes a stated µm/px (not an estimated one)."""
    import dataclasses

    import pandas as pd

    from napari_hemato.core.cells import classify_wbcs
    from napari_hemato.core.slide import slide_from_array
    from napari_hemato.core.spec import ModelSpec
    from napari_hemato.models.cell_classifier import CLASS_NAMES

    class Fake:
        spec = ModelSpec(name="fake-red", version="0", task="wbc", kind="classifier",
                         class_names=CLASS_NAMES, outputs={"probs": "p"},
                         preprocess={"context": 1.8, "scale": "red-cell", "window_um": 25.0})

        def __init__(self):
            self.seen = []

        def classify_crops(self, crops, diameters=None, *, mpp=None):
            self.seen += [(c.shape[0], mpp) for c in crops]
            return np.full((len(crops), 11), 1 / 11), [np.zeros(c.shape[:2]) for c in crops]

    table = pd.DataFrame({"id": [1], "y": [150.0], "x": [150.0], "area_px": [np.pi * 20**2],
                          "class": ["WBC"], "confidence": [0.9]})
    slide = slide_from_array(np.full((300, 300, 3), 230, np.uint8))
    stated = dataclasses.replace(slide, mpp=0.25, mpp_source="user")
    fake = Fake()
    classify_wbcs(table, stated, fake)
    assert fake.seen[-1][1] == 0.25 and fake.seen[-1][0] >= 25.0 / 0.25  # the whole 100 px window
    classify_wbcs(table, dataclasses.replace(slide, mpp=0.25, mpp_source="red-cells"), fake)
    assert fake.seen[-1][1] is None and fake.seen[-1][0] >= 6 * 40  # the ruler's neighbourhood


def test_smear_corrections_are_exported_with_red_cells_around_each_white_cell(tmp_path):
    """The Review dock's WBC fine-tune data: crops wide enough for the red-cell ruler, whose
    reading then matches the field's own."""
    import pandas as pd

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.io.cell_images import list_cell_images
    from napari_hemato.tasks import get_task
    from napari_hemato.tasks.smear import CORRECTION_CONTEXT

    field = _smear((600, 640), 30.0, wbc=70, seed=3)
    Image.fromarray(field).save(tmp_path / "field.png")
    row = {"id": 1, "class": "LY", "y": 299.5, "x": 319.5, "bbox_y0": 265, "bbox_x0": 285,
           "bbox_y1": 335, "bbox_x1": 355, "area_px": float(np.pi * 35**2), "reviewed": True,
           "provenance": "corrected"}
    ann = AnnotationSet("instances", pd.DataFrame([row]), ["LY"], image_path=str(tmp_path / "field.png"),
                        image_shape=field.shape[:2])
    out = get_task("smear").export_corrections(ann, tmp_path / "corrections")
    listed = list_cell_images(out, groups=True)
    crop = np.asarray(Image.open(out / listed["path"].iloc[0]).convert("RGB"))
    assert crop.shape[0] >= CORRECTION_CONTEXT * 70
    on_crop = estimate_red_cell_diameter(crop, exclude=[((crop.shape[0] - 1) / 2, (crop.shape[1] - 1) / 2, 70.0)])
    on_field = estimate_red_cell_diameter(field, exclude=[(299.5, 319.5, 70.0)])
    assert on_crop.ok and abs(on_crop.diameter_px / on_field.diameter_px - 1) < 0.1


def test_classify_cells_takes_a_known_pixel_size(tmp_path, capsys):
    """``classify-cells --mpp``: a red-cell-scale model's window is window_um / mpp, the ruler unused."""
    import pandas as pd

    from napari_hemato.cli import main
    from napari_hemato.models.cell_classifier import CellClassifier

    folder = _tiny(tmp_path / "red", {"context": 1.8, "scale": "red-cell", "window_um": 25.0})
    crop = _smear((300, 400), 30.0, wbc=70)[60:240, 110:290]
    Image.fromarray(crop).save(tmp_path / "cell.png")
    assert main(["classify-cells", str(tmp_path / "cell.png"), "--model", str(folder), "--mpp", "0.5",
                 "--out", str(tmp_path / "cells.csv")]) == 0
    got = pd.read_csv(tmp_path / "cells.csv").filter(like="prob_").to_numpy()
    clf = CellClassifier(folder, threads=1)
    at_half, _ = clf.classify_crops([crop], mpp=0.5)  # a 50 px window
    np.testing.assert_allclose(got, at_half, atol=1e-4)
    ruler, _ = clf.classify_crops([crop])  # the ruler reads 0.25 µm/px here: another window
    assert not np.allclose(ruler, at_half, atol=1e-4)
    assert main(["classify-cells", str(tmp_path / "cell.png"), "--model", str(folder), "--mpp", "-1",
                 "--out", str(tmp_path / "bad.csv")]) == 2
    assert "--mpp" in capsys.readouterr().err


def test_the_ruler_reads_alike_at_the_cells_working_resolution():
    """``cell_px`` shrinks the image to WORK_CELL_PX per white-cell diameter: same reading."""
    from napari_hemato.models.red_cell_ruler import WORK_CELL_PX

    img = _smear((400, 420), 40.0, wbc=110)
    full = estimate_red_cell_diameter(img, exclude=[(199.5, 209.5, 110.0)])
    small = estimate_red_cell_diameter(img, exclude=[(199.5, 209.5, 110.0)], cell_px=110.0)
    assert WORK_CELL_PX < 110 and full.ok and small.ok
    assert abs(small.diameter_px / full.diameter_px - 1) < 0.05


def test_pooled_reading_agrees_or_refuses():
    """One pixel size for a sample: the median when readings agree, None when they disagree
    (two magnifications) or too few succeed."""
    from napari_hemato.models.window_scale import POOL_MIN_OK, pool_readings

    rng = np.random.default_rng(0)
    one = 0.22 * (1 + rng.normal(0, 0.04, 24))
    r = pool_readings(list(one), 24)
    assert r.ok and r.mpp == pytest.approx(np.median(one)) and r.spread < 0.1
    mixed = list(one[:12]) + list(1.5 * one[12:])
    assert not pool_readings(mixed, 24).ok and pool_readings(mixed, 24).spread > 0.2
    few = [None] * (24 - POOL_MIN_OK + 1) + list(one[: POOL_MIN_OK - 1])
    assert not pool_readings(few, 24).ok and pool_readings(few, 24).n_ok == POOL_MIN_OK - 1


def test_classify_cells_pools_the_ruler_per_image_size(tmp_path, capsys):
    """``classify-cells`` reads a sample of each image size and gives its median to all images
    of that size: the probabilities are those at that pixel size; a group too small to pool, and
    ``--ruler per-cell``, read each image."""
    import pandas as pd

    from napari_hemato.cli import main
    from napari_hemato.models.cell_classifier import CellClassifier
    from napari_hemato.models.window_scale import POOL_SAMPLE

    folder = _tiny(tmp_path / "red", {"context": 1.8, "scale": "red-cell", "window_um": 25.0})
    cells = tmp_path / "cells"
    cells.mkdir()
    n = 2 * POOL_SAMPLE
    crops = [_smear((300, 400), 30.0, wbc=70, seed=i)[60:240, 110:290] for i in range(n)]
    for i, c in enumerate(crops):  # 180 x 180: red cells 30 px = 7.5 µm -> ~0.25 µm/px
        Image.fromarray(c).save(cells / f"a{i:02d}.png")
    small = _zoom(crops[0], 0.8)  # one image of another size: read alone
    Image.fromarray(small).save(cells / "b.png")
    assert main(["classify-cells", str(cells), "--model", str(folder),
                 "--out", str(tmp_path / "pooled.csv")]) == 0
    said = capsys.readouterr().out
    assert f"for the {n} images of 180x180 px" in said
    got = pd.read_csv(tmp_path / "pooled.csv").filter(like="prob_").to_numpy()
    clf = CellClassifier(folder, threads=1)
    reading = clf.pooled_mpp(crops[:POOL_SAMPLE])
    assert reading.ok and abs(reading.mpp / 0.25 - 1) < 0.1  # the ruler reads a little short
    assert f"pixel size {reading.mpp:.4f}" in said
    at_pool, _ = clf.classify_crops(crops, mpp=reading.mpp)
    np.testing.assert_allclose(got[:n], at_pool, atol=1e-4)
    alone, _ = clf.classify_crops([small])  # its own ruler reading
    np.testing.assert_allclose(got[n:], alone, atol=1e-4)
    assert main(["classify-cells", str(cells), "--model", str(folder), "--ruler", "per-cell",
                 "--out", str(tmp_path / "each.csv")]) == 0
    assert "pixel size" not in capsys.readouterr().out
