"""Colour match before the smear detector (``preprocess["colour_match"]``): images like the
training images pass untouched; another lab's glass and stain density are pulled back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from napari_hemato.core.colour_match import _stats, match_colour, measure_colour
from napari_hemato.core.spec import load_spec
from napari_hemato.models.registry import bundled_models

PARAMS = {"glass": [207.0, 208.0, 203.0], "cell_od": [0.15, 0.3, 0.2], "min_cell_od": 0.3,
          "scale_limits": [0.33, 3.0], "stain_tolerance": 1.2, "glass_tolerance_od": 0.03}


def field(glass, cell_od, seed=0) -> np.ndarray:
    """A field of disc-shaped cells of optical density ``cell_od`` on ``glass``, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:120, :160]
    cells = np.zeros((120, 160), bool)
    for cy, cx in rng.uniform((10, 10), (110, 150), (12, 2)):
        cells |= (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
    od = np.where(cells[..., None], np.asarray(cell_od), 0.0)
    img = np.asarray(glass, np.float64) * np.exp(-od) + rng.normal(0, 1.0, (120, 160, 3))
    return np.clip(np.round(img), 0, 254).astype(np.uint8)


def test_a_field_like_the_training_images_passes_untouched():
    img = field((207, 208, 203), (0.16, 0.28, 0.19))  # within the tolerances of PARAMS
    assert (match_colour(img, PARAMS) == img).all()


def test_another_labs_glass_and_stain_are_pulled_back_within_the_tolerance():
    img = field((235, 225, 200), (0.40, 0.20, 0.45))  # cream glass, denser and redder stain
    out = match_colour(img, PARAMS)
    glass, cells = _stats(out, PARAMS["min_cell_od"])
    np.testing.assert_allclose(glass, PARAMS["glass"], atol=3)
    ratio = np.asarray(PARAMS["cell_od"]) / cells
    assert (ratio <= PARAMS["stain_tolerance"] * 1.05).all() and (ratio >= 1 / PARAMS["stain_tolerance"] / 1.05).all()


def test_the_engines_white_padding_stays_white_and_is_no_glass():
    img = field((235, 225, 200), (0.40, 0.20, 0.45))
    padded = np.pad(img, ((40, 40), (40, 40), (0, 0)), constant_values=255)
    out = match_colour(padded, PARAMS)
    assert (out[:40] == 255).all() and (out[:, :40] == 255).all()
    # the glass measured without the padding: the image inside matches as it would alone
    assert np.abs(out[40:-40, 40:-40].astype(int) - match_colour(img, PARAMS).astype(int)).max() <= 1


def test_measure_colour_gives_the_medians_and_the_spread_as_tolerances():
    images = [field((207 + k, 208, 203 - k), (0.15 * (1 + 0.05 * k), 0.3, 0.2), seed=k + 3) for k in range(-3, 4)]
    p = measure_colour(images)
    np.testing.assert_allclose(p["glass"], (207, 208, 203), atol=1.5)
    np.testing.assert_allclose(p["cell_od"], (0.15, 0.3, 0.2), rtol=0.05)
    assert 1.0 < p["stain_tolerance"] < 1.3 and 0 < p["glass_tolerance_od"] < 0.05
    assert all(match_colour(im, p).shape == im.shape for im in images)


def test_the_spec_normalizes_the_colour_matched_image():
    spec = load_spec(bundled_models()["smear"])
    assert spec.preprocess["colour_match"]["stain_tolerance"] > 1
    img = field((235, 225, 200), (0.40, 0.20, 0.45))[None]
    matched = match_colour(img[0], spec.preprocess["colour_match"])[None]
    np.testing.assert_array_equal(spec.normalize(img), replace(spec, preprocess={}).normalize(matched))


def test_bccd_fields_pass_untouched_and_pbc_cells_do_not(shared_data):
    """The bundled smear detector's colour match (tolerances: its 180 training fields' own
    spread) leaves most held-out BCCD fields as they are and changes every PBC image (another
    lab: CellaVision's cream glass)."""
    from napari_hemato.train import data_smear as ds

    params = load_spec(bundled_models()["smear"]).preprocess["colour_match"]
    bccd = shared_data / "bccd"
    val = ds.split_stems(bccd)[2]
    untouched = [bool((match_colour(im := ds.read_rgb(bccd / "JPEGImages" / f"{s}.jpg"), params) == im).all())
                 for s in val]
    assert np.mean(untouched) > 0.85
    pbc = sorted(Path(shared_data / "pbc").glob("*/*.jpg"))[::400]
    assert pbc and not any(bool((match_colour(im := ds.read_rgb(f), params) == im).all()) for f in pbc)


class _Recorder:
    """A predictor that keeps what the network would be fed (its spec's normalisation)."""

    def __init__(self, spec):
        self.spec, self.fed = spec, []

    def predict(self, batch, *, cancel=None, roles=None):
        self.fed.append(self.spec.normalize(np.asarray(batch)))
        return {}


def test_an_images_colour_is_measured_once_and_every_part_of_it_matched_alike():
    """Two halves of one scan (sparse cells left, crowded right) get the same tables once
    the predictor is fixed to the image: a pixel value maps to one output value in both."""
    from napari_hemato.core.colour_match import for_image
    from napari_hemato.core.slide import slide_from_array

    spec = replace(load_spec(bundled_models()["smear"]), preprocess={"colour_match": PARAMS})
    sparse = field((235, 225, 200), (0.40, 0.20, 0.45), seed=1)
    crowded = field((235, 225, 200), (0.40, 0.20, 0.45), seed=2)
    crowded[30:90, 40:120] = np.clip(np.asarray((235, 225, 200)) * np.exp(-np.asarray((0.9, 0.5, 1.0))), 0, 255)
    scan = np.concatenate([sparse, crowded], axis=1)
    each = [match_colour(half, PARAMS) for half in (sparse, crowded)]
    fixed = for_image(_Recorder(spec), slide_from_array(scan))
    cm = fixed.spec.preprocess["colour_match"]
    assert {"image_glass", "image_cell_od"} <= set(cm) and cm["image_cell_od"] is not None
    once = [match_colour(half, cm) for half in (sparse, crowded)]
    np.testing.assert_array_equal(np.concatenate(once, axis=1), match_colour(scan, cm))
    # tile by tile, the same glass pixel came out differently in the two halves; fixed, it does not
    v = sparse[0, 0]
    where = np.argwhere((crowded == v).all(-1))[0]
    assert (once[0][0, 0] == once[1][tuple(where)]).all()
    assert not (each[0][0, 0] == each[1][tuple(where)]).all()
    fixed.predict(sparse[None])
    np.testing.assert_array_equal(fixed.fed[0], replace(spec, preprocess={}).normalize(once[0][None]))


def test_a_model_without_colour_match_is_returned_as_it_is():
    from napari_hemato.core.colour_match import for_image
    from napari_hemato.core.slide import slide_from_array

    rec = _Recorder(replace(load_spec(bundled_models()["smear"]), preprocess={}))
    assert for_image(rec, slide_from_array(field((207, 208, 203), (0.2, 0.3, 0.2)))) is rec


def test_a_large_image_is_sampled_in_patches_spread_over_it():
    from napari_hemato.core.colour_match import SAMPLE_PATCH, colour_sample
    from napari_hemato.core.slide import slide_from_array

    big = np.zeros((3000, 5000, 3), np.uint8)
    big[:, :, 0] = (np.arange(5000) // 20).astype(np.uint8)[None, :]  # the column shows where
    sample = colour_sample(slide_from_array(big), max_pixels=8 * SAMPLE_PATCH**2)
    assert sample.shape[1:] == (SAMPLE_PATCH, SAMPLE_PATCH, 3) and 6 <= len(sample) <= 8
    firsts = sorted({int(p[0, 0, 0]) for p in sample})
    assert firsts[0] == 0 and firsts[-1] >= (5000 - SAMPLE_PATCH) // 20 - 1  # left edge to right edge
    whole = colour_sample(slide_from_array(big[:400, :600]))
    assert whole.shape == (1, 400, 600, 3)
    roi = colour_sample(slide_from_array(big), roi=(100, 1000, 300, 1400))
    assert roi.shape == (1, 200, 400, 3) and roi[0, 0, 0, 0] == 1000 // 20


def test_the_run_records_the_colour_it_matched(tmp_path):
    """``analyze`` on a smear field: the run's config holds the field's measured colour (so a
    resume matches the same way, and a reader of the run sees what was done)."""
    from napari_hemato.api import analyze
    from napari_hemato.core.slide import slide_from_array

    img = np.concatenate([field((235, 225, 200), (0.40, 0.20, 0.45), seed=s) for s in range(4)], axis=1)
    slide = slide_from_array(img, mpp=0.1)
    result = analyze(slide, task="smear", out=tmp_path / "r.zarr", tissue="none")
    cm = result.store.config["spec"]["preprocess"]["colour_match"]
    assert cm["image_glass"] == pytest.approx([235, 225, 200], abs=2)
    assert cm["image_cell_od"] is not None


def test_the_fixed_predictor_shares_the_loaded_network():
    """Fixing the colour is per image: it must not load the network again."""
    from napari_hemato.api import load_predictor
    from napari_hemato.core.colour_match import for_image
    from napari_hemato.core.slide import slide_from_array

    predictor = load_predictor("smear")
    fixed = for_image(predictor, slide_from_array(field((235, 225, 200), (0.40, 0.20, 0.45))))
    assert fixed is not predictor and fixed.session is predictor.session
    assert "image_glass" not in predictor.spec.preprocess["colour_match"]  # the original unchanged
