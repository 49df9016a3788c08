"""Post-processing invariants: the fast h-maxima seeds equal the h-maxima transform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from napari_hemato.core.postprocess import (
    _h_maxima_markers,
    _h_maxima_regions,
    _local_peaks,
    instances_from_maps,
)


def reference_h_maxima(values, h, inside, seed_mask):
    """The textbook h-maxima: regional maxima of the reconstruction of ``v - h`` under ``v``."""
    v = np.where(inside, values, 0.0).astype(np.float64)
    rec = reconstruction(v - h, v, method="dilation")
    peaks = local_maxima(rec, connectivity=2, allow_borders=True) & seed_mask
    return ndi.label(peaks, structure=np.ones((3, 3), bool))[0]


def blobs(seed, shape=(160, 200), n=40):
    """A distance-like map: touching blobs of different heights and widths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    v = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r, top = rng.uniform(4, 12), rng.uniform(0.2, 1.0)
        v = np.maximum(v, top * (1 - np.hypot(yy - cy, xx - cx) / r))
    return (v + rng.normal(0, 0.01, shape) * (v > 0)).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h", [0.05, 0.15, 0.3])
def test_fast_h_maxima_equals_the_reconstruction(seed, h):
    v = blobs(seed)
    inside = v > 0.05
    seed_mask = inside & (v > 0.1)
    fast = _h_maxima_markers(v, h, inside, seed_mask)
    ref = reference_h_maxima(v, h, inside, seed_mask)
    assert ref.max() > 5
    assert fast.max() == ref.max()
    # the same maxima: every reference marker holds exactly one fast marker and back
    both = (fast > 0) & (ref > 0)
    pairs = np.unique(np.stack([fast[both], ref[both]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == ref.max()
    assert ((fast > 0) <= (ref > 0)).all()  # fast keeps each maximum's plateau, a subset


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h", [0.05, 0.15, 0.3])
def test_merged_basins_are_the_watershed_from_the_h_maxima(seed, h):
    """One watershed whose basins merge by dynamics gives the objects (and almost every
    pixel) of the two-watershed way: h-maxima markers, then a watershed from them."""
    v = blobs(seed)
    inside = v > 0.05
    regions = _h_maxima_regions(v, h, inside, floor=0.1)
    markers = _h_maxima_markers(v, h, inside, inside & (v > 0.1))
    ref = watershed(-v, markers, mask=inside, connectivity=2)
    assert markers.max() > 5
    ids = np.unique(regions[regions > 0])
    assert len(ids) == markers.max()
    # each marker lies in one region, each region holds one marker
    pairs = np.unique(np.stack([markers[markers > 0], regions[markers > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == len(ids)
    assert ((regions > 0) == (ref > 0)).all()  # the same pixels are objects
    lut = dict(zip(pairs[1].tolist(), pairs[0].tolist(), strict=True))
    same = np.vectorize(lambda r: lut.get(r, 0))(regions[inside]) == ref[inside]
    assert same.mean() > 0.97  # only the borders between touching objects may move


def test_h_maxima_seeds_split_deep_saddles_only():
    """Two nuclei joined by a deep saddle split; one nucleus with two shallow peaks does not."""
    yy, xx = np.mgrid[:40, :80]
    pair = np.maximum(1 - np.hypot(yy - 20, xx - 25) / 12, 1 - np.hypot(yy - 20, xx - 47) / 12)
    lumpy = np.maximum(1 - np.hypot(yy - 20, xx - 35) / 14, 0.95 - np.hypot(yy - 20, xx - 40) / 14)
    for dist, expected in ((pair, 2), (lumpy, 1)):
        fg = (dist > 0).astype(np.float32)
        assert instances_from_maps(fg, dist, seed_h=0.15, min_area_px=4).max() == expected


def test_background_only_gives_no_markers():
    v = np.zeros((20, 20), np.float32)
    assert _h_maxima_markers(v, 0.1, v > 0, v > 0).max() == 0
    v[10, 10] = 0.05  # a speck lower than h is not a nucleus
    assert _h_maxima_markers(v, 0.1, v > 0, v > 0).max() == 0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("threshold", [0.3, 0.8, 0.97])
def test_peaks_on_the_box_around_the_mask_are_the_whole_image_peaks(seed, threshold):
    """The maximum filter runs only around the pixels above threshold (edges included)."""
    v = blobs(seed, shape=(120, 150), n=25)
    v[0, :6] = v[-3:, -1] = 0.99  # candidates touching the image edges
    mask = v > threshold
    radius = 7
    full = (v == ndi.maximum_filter(v, size=2 * radius + 1, mode="nearest")) & mask
    ref = ndi.label(full, structure=np.ones((3, 3), bool))[0]
    np.testing.assert_array_equal(_local_peaks(v, mask, radius), ref)
