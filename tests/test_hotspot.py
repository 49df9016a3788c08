"""The mitosis hotspot's pruned search gives the window counting every window would."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from napari_hemato.tasks.mitosis import _densest_window, hotspot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_search_equals_counting_every_window(seed):
    rng = np.random.default_rng(seed)
    n = 6000  # above the brute-force cut-off: the bounds are used
    pts = np.concatenate([rng.uniform(0, 4000, (n, 2)), rng.normal(1500, 30, (n // 10, 2))])
    pts = np.round(pts, 0)  # points on window edges, tied counts
    centres = pts + rng.integers(-5, 6, pts.shape)
    for half in (20.0, 150.0):
        counts = cKDTree(pts).query_ball_point(centres, half, p=np.inf, return_length=True)
        assert _densest_window(pts, centres, half) == (int(np.argmax(counts)), int(counts.max()))


def test_hotspot_of_many_mitoses_is_the_densest_window():
    rng = np.random.default_rng(3)
    n = 5000
    yx = np.concatenate([rng.uniform(0, 40000, (n, 2)), rng.normal(30000, 400, (300, 2))])
    t = pd.DataFrame({"id": np.arange(len(yx)) + 1, "y": yx[:, 0], "x": yx[:, 1],
                      "class": "normal"})
    spot = hotspot(t, mpp=0.25, region=(0, 0, 40000, 40000))
    half_px = spot["side_um"] / 0.25 / 2  # the 10-HPF window (1539 µm) holds the cluster
    assert spot["count"] >= 300 and abs(spot["y"] - 30000) < half_px and abs(spot["x"] - 30000) < half_px
