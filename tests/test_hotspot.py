"""The mitosis hotspot: the densest 10-HPF window, found from a summed-area table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.tasks.mitosis import _densest_window, hotspot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_search_equals_counting_every_window_position(seed):
    """Every window position on the grid counted one by one gives the same best window (the
    first in raster order among ties), and its count is the points geometrically inside."""
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.uniform(0, 200, (300, 2)), rng.normal(120, 4, (30, 2))])
    pts = np.round(pts, 0)  # points on bin edges, tied counts
    side = 40.0
    w = _densest_window(pts[:, 0], pts[:, 1], (200.0, 200.0), side)
    starts = np.arange(0, 200 / (side / 64) - 64 + 1) * (side / 64)
    y_in = (pts[None, :, 0] >= starts[:, None]) & (pts[None, :, 0] < starts[:, None] + side)
    x_in = (pts[None, :, 1] >= starts[:, None]) & (pts[None, :, 1] < starts[:, None] + side)
    counts = y_in.astype(int) @ x_in.T.astype(int)  # counts[iy, ix], every position
    iy, ix = np.unravel_index(np.argmax(counts), counts.shape)
    assert (w.count, w.y0, w.x0) == (counts.max(), starts[iy], starts[ix])
    inside = y_in[iy] & x_in[ix]
    assert set(np.flatnonzero(inside)) == set(w.members.tolist())


def test_window_search_finds_a_planted_cluster_among_a_million_points():
    rng = np.random.default_rng(4)
    pts = np.concatenate([rng.uniform(0, 1e5, (1_000_000, 2)), rng.normal(70000, 800, (2000, 2))])
    w = _densest_window(pts[:, 0], pts[:, 1], (1e5, 1e5), 6158.0)
    assert abs(w.y0 + 3079 - 70000) < 3079 and abs(w.x0 + 3079 - 70000) < 3079
    expected = 1_000_000 * (6158.0 / 1e5) ** 2 + 2000  # background + the cluster
    assert 0.9 * expected < w.count < 1.1 * expected


def test_hotspot_of_many_mitoses_is_the_densest_window():
    rng = np.random.default_rng(3)
    n = 5000
    yx = np.concatenate([rng.uniform(0, 40000, (n, 2)), rng.normal(30000, 400, (300, 2))])
    t = pd.DataFrame({"id": np.arange(len(yx)) + 1, "y": yx[:, 0], "x": yx[:, 1],
                      "class": "normal"})
    spot = hotspot(t, mpp=0.25, region=(0, 0, 40000, 40000))
    half_px = spot["side_um"] / 0.25 / 2  # the 10-HPF window (1539 µm) holds the cluster
    assert spot["count"] >= 300 and abs(spot["y"] - 30000) < half_px and abs(spot["x"] - 30000) < half_px
