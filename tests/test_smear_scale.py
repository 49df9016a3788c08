"""Pixel size of a smear field measured on its red cells (bundled smear model, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.io import imread, imsave
from skimage.transform import rescale

from napari_hemato.core.slide import open_slide
from napari_hemato.core.smear_scale import estimate_smear_mpp
from napari_hemato.models.registry import BUNDLED

MODEL = BUNDLED / "smear"
#: validation fields (never trained on, not used to calibrate the red-cell reference)
STEMS = ("BloodImage_00000", "BloodImage_00002")


@pytest.fixture(scope="module")
def predictor():
    from napari_hemato.api import load_predictor

    if not (MODEL / "model.onnx").exists():
        pytest.skip("bundled smear model not present")
    return load_predictor("smear", MODEL, threads=2)


@pytest.mark.shared_data
@pytest.mark.parametrize("stem", STEMS)
def test_the_estimate_follows_the_fields_magnification(predictor, shared_data, tmp_path, stem):
    """A BCCD field (0.08 µm/px) shown at other magnifications: the estimate moves with it.

    Red cells differ between people (6-9 µm), so one field's estimate may be 20-25 % off;
    across magnifications of the same field it must stay consistent.
    """
    img = imread(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg")
    scaled = []
    for scale in (0.6, 1.0, 1.7):
        im = rescale(img, scale, channel_axis=-1, anti_aliasing=scale < 1,
                     preserve_range=True).round().astype(np.uint8)
        imsave(tmp_path / "f.png", im, check_contrast=False)
        est = estimate_smear_mpp(predictor, open_slide(tmp_path / "f.png"))
        assert est.mpp is not None and est.converged and est.n_cells >= 5
        assert 0.7 < est.mpp / (0.08 / scale) < 1.43, (scale, est.rounds)
        scaled.append(est.mpp * scale)  # the field's own pixel size, seen through each zoom
    assert max(scaled) / min(scaled) < 1.3, scaled


def test_a_field_without_red_cells_falls_back_to_the_assumed_pixel_size(predictor, tmp_path):
    from napari_hemato.api import analyze

    imsave(tmp_path / "blank.png", np.full((200, 300, 3), 235, np.uint8), check_contrast=False)
    assert estimate_smear_mpp(predictor, open_slide(tmp_path / "blank.png")).mpp is None
    result = analyze(tmp_path / "blank.png", task="smear", model=MODEL, classifier=False,
                     out=tmp_path / "r.zarr")
    assert result.grid.mpp_assumed and result.grid.mpp0 == predictor.spec.assumed_input_mpp
    assert result.store.config["slide"]["mpp_source"] == "none"


@pytest.mark.shared_data
def test_analyze_measures_a_jpeg_field_and_records_it(predictor, shared_data, tmp_path):
    from napari_hemato.api import analyze

    path = shared_data / "bccd" / "JPEGImages" / f"{STEMS[0]}.jpg"
    result = analyze(path, task="smear", model=MODEL, classifier=False, out=tmp_path / "a.zarr")
    assert not result.grid.mpp_assumed
    assert result.store.config["slide"]["mpp_source"] == "red-cells"
    assert result.grid.mpp0 == 0.08  # its red cells agree with BCCD's 0.08: that value is kept
    zoomed = tmp_path / "zoomed.png"  # the same field through a 1.7x stronger objective
    img = imread(path)
    imsave(zoomed, rescale(img, 1.7, channel_axis=-1, preserve_range=True).round().astype(np.uint8),
           check_contrast=False)
    far = analyze(zoomed, task="smear", model=MODEL, classifier=False, out=tmp_path / "z.zarr")
    assert 0.8 < far.grid.mpp0 / (0.08 / 1.7) < 1.25  # measured, not assumed
    off = analyze(path, task="smear", model=MODEL, classifier=False, estimate_mpp=False,
                  out=tmp_path / "b.zarr")
    assert off.grid.mpp_assumed and off.grid.mpp0 == 0.08
    given = analyze(path, task="smear", model=MODEL, classifier=False, mpp=0.1, out=tmp_path / "c.zarr")
    assert given.grid.mpp0 == 0.1 and given.store.config["slide"]["mpp_source"] == "user"


@pytest.mark.shared_data
def test_calibration_on_training_fields_recovers_the_shipped_reference(predictor, shared_data):
    from napari_hemato.core.smear_scale import calibrate_reference
    from napari_hemato.train.smear import split_stems

    train, _, _ = split_stems(shared_data / "bccd")
    slides = [open_slide(shared_data / "bccd" / "JPEGImages" / f"{s}.jpg") for s in train[::3][:6]]
    probe = calibrate_reference(predictor, [(s, 0.08) for s in slides])
    shipped = predictor.spec.extra["red_cell_probe"]["reference_diameter_um"]
    assert 0.85 < probe["reference_diameter_um"] / shipped < 1.15  # 6 of the 60 fields used
    assert probe["fields"] == 6
