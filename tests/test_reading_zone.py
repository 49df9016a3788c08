"""A smear scan's reading zone: the monolayer is read; the thick area, the feathered edge and
the glass are not; a camera field is read whole."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.reading_zone import (
    COVERAGE_RANGE,
    FIELD_PIXELS,
    MAX_OVERLAP,
    detect_reading_zone,
    field_fractions,
)
from napari_hemato.core.slide import slide_from_array

GLASS = np.array([225.0, 220.0, 228.0])
RBC_OD = np.array([0.15, 0.32, 0.2])  # one layer of red cell, per channel


def red_cells(shape, spacing_um, mpp, *, seed, radius_um=3.75):
    """Summed-OD image of red cells (discs) about ``spacing_um`` apart, stacked where they
    overlap (their densities add)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    od = np.zeros((h, w), np.float32)
    r = radius_um / mpp
    step = spacing_um / mpp
    ys, xs = np.meshgrid(np.arange(-step, h + step, step), np.arange(-step, w + step, step), indexing="ij")
    centres = np.column_stack([ys.ravel(), xs.ravel()]) + rng.uniform(-step / 3, step / 3, (ys.size, 2))
    k = int(np.ceil(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    for cy, cx in centres:
        iy, ix = int(round(cy)), int(round(cx))
        disc = ((yy + iy - cy) ** 2 + (xx + ix - cx) ** 2 <= r**2).astype(np.float32)
        y0, x0 = iy - k, ix - k
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + 2 * k + 1, h), min(x0 + 2 * k + 1, w)
        if ya < yb and xa < xb:
            od[ya:yb, xa:xb] += disc[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return od


def to_rgb(layers, seed=0):
    rng = np.random.default_rng(seed)
    img = GLASS * np.exp(-layers[..., None] * RBC_OD) + rng.normal(0, 1.5, layers.shape + (3,))
    return np.clip(np.round(img), 0, 254).astype(np.uint8)


def smear_scan(mpp=0.25, band=(1000, 1600)):
    """Glass, the feathered edge (cells far apart), the monolayer, the thick area (cells
    piled), left to right down the smear: four bands; returns the image and each band's
    column range."""
    spacings = [None, 22.0, 8.8, 4.5]
    parts = [np.zeros(band, np.float32) if s is None else red_cells(band, s, mpp, seed=i)
             for i, s in enumerate(spacings)]
    return to_rgb(np.concatenate(parts, axis=0)), band[0]


def test_the_monolayer_is_read_and_the_edges_are_not():
    img, b = smear_scan()
    slide = slide_from_array(img, mpp=0.25)
    zone = detect_reading_zone(slide, field_pixels=0)
    assert zone is not None and zone.mpp == pytest.approx(48, rel=0.05)
    rows = (np.arange(zone.shape[0]) + 0.5) * zone.scale[0]
    band = (rows // b).astype(int)  # 0 glass, 1 feathered edge, 2 monolayer, 3 thick
    inner = np.abs(rows - (band + 0.5) * b) < b / 2 - zone.scale[0]  # not across two bands
    frac = [zone.mask[(band == k) & inner].mean() for k in range(4)]
    assert frac[2] > 0.9, frac
    assert frac[0] == 0 and frac[1] < 0.1 and frac[3] < 0.1, frac
    assert zone.area_mm2 == pytest.approx(frac[2] * 0.25 * 0.4, rel=0.3)


def test_a_blank_scan_has_no_reading_zone():
    rng = np.random.default_rng(0)
    img = np.clip(GLASS + rng.normal(0, 1.5, (2500, 2000, 3)), 0, 255).astype(np.uint8)
    zone = detect_reading_zone(slide_from_array(img, mpp=0.25), field_pixels=0)
    assert zone is not None and zone.empty


def test_a_smear_run_on_a_blank_scan_ends_at_once_saying_so(tmp_path):
    from napari_hemato.api import analyze

    rng = np.random.default_rng(0)
    img = np.clip(GLASS + rng.normal(0, 1.5, (2500, 2000, 3)), 0, 255).astype(np.uint8)
    from .test_tissue import write_pyramid

    result = analyze(write_pyramid(tmp_path / "blank.tif", img, mpp=0.25), task="smear",
                     out=tmp_path / "r.zarr", classifier=False)
    assert any("no tissue found" in w for w in result.warnings) and len(result.table()) == 0


def test_a_camera_field_is_read_whole_without_looking():
    field = to_rgb(red_cells((480, 640), 30.0, 0.1, seed=3))  # sparse: would not be "readable"
    assert field.shape[0] * field.shape[1] <= FIELD_PIXELS
    assert detect_reading_zone(slide_from_array(field, mpp=0.1)) is None
    assert detect_reading_zone(slide_from_array(field, mpp=0.1), field_pixels=0).empty


def test_a_region_is_judged_only_inside_it():
    img, b = smear_scan()
    slide = slide_from_array(img, mpp=0.25)
    zone = detect_reading_zone(slide, roi=(2 * b, 0, 3 * b, 800), field_pixels=0)
    top = np.arange(zone.shape[0]) * zone.scale[0]  # each window's level-0 extent
    left = np.arange(zone.shape[1]) * zone.scale[1]
    rows = (top + zone.scale[0] > 2 * b) & (top < 3 * b)
    cols = left < 800
    assert not zone.mask[~rows].any() and not zone.mask[:, ~cols].any()  # nothing outside
    assert zone.mask[np.ix_(rows, cols)].mean() > 0.7


def test_the_smear_task_skips_tiles_outside_the_reading_zone(tmp_path):
    """``analyze --task smear`` on a scan: tissue "auto" (the task's default) is the reading
    zone; tiles off it are not read and the run records the zone's area."""
    from napari_hemato.api import analyze
    from napari_hemato.tasks.smear import differential

    from .test_tissue import write_pyramid

    img, b = smear_scan(mpp=0.25, band=(1100, 1000))
    scan = write_pyramid(tmp_path / "scan.tif", img, mpp=0.25)  # a scanner's pyramid: judged
    result = analyze(scan, task="smear", out=tmp_path / "r.zarr", classifier=False, tile=512)
    info = result.store.config["tissue_info"]
    assert info is not None and info["tiles_off_tissue"] > 0
    assert 0.05 < info["area_mm2"] < 0.09  # the monolayer band: 0.275 x 0.25 mm = 0.069
    # tiles touching the zone are read whole: cells found lie in the monolayer band or within
    # a tile (and its halo) of it, none in the glass or at the far ends of the other bands ...
    table = result.table()
    y = table["y"].to_numpy()
    # (a window straddling two bands may be readable: half monolayer)
    reach = (result.plan.tile + result.plan.halo) * result.grid.factor + result.tissue.scale[0]
    assert len(y) > 100 and (y > 2 * b - reach).all() and (y < 3 * b + reach).all()
    # ... and the ones outside the zone are marked and left out of the counts
    inside = table["in_reading_zone"].to_numpy()
    band = (y > 2 * b) & (y < 3 * b)
    # (the zone's edge is a window wide: cells in a window straddling two bands may be out)
    margin = result.tissue.scale[0]
    assert inside[band].mean() > 0.8 and not inside[(y < 2 * b - margin) | (y > 3 * b + margin)].any()
    d = differential(table)
    assert d["outside_reading_zone"] == int((~inside).sum()) > 0
    assert d["rbc"] == int((table["class"][inside] == "RBC").sum()) > 0


def test_fields_people_chose_to_read_lie_inside_the_limits(shared_data):
    """The limits' calibration: BCCD fields and PBC CellaVision crops (two labs, each image
    taken where a person reads) judged as one window each fall inside the readable range."""
    from napari_hemato.core.slide import open_slide

    bccd = sorted((shared_data / "bccd" / "JPEGImages").glob("*.jpg"))[::8]
    pbc = sorted((shared_data / "pbc").glob("*/*.jpg"))[::300]
    got = [field_fractions(open_slide(f, mpp=0.093)) for f in bccd]
    got += [field_fractions(open_slide(f, mpp=0.221)) for f in pbc]
    cov, over = np.array(got).T
    assert len(got) > 60
    assert (cov >= COVERAGE_RANGE[0]).all() and (cov <= COVERAGE_RANGE[1]).all()
    assert (over <= MAX_OVERLAP).all()
