"""Tile planner invariants: cores partition the extent, ownership is unique."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_hemato.core.tiling import intersect, plan_tiles


@pytest.mark.parametrize("shape", [(1, 1), (100, 100), (513, 1025), (1000, 37)])
@pytest.mark.parametrize("tile,halo", [(64, 0), (128, 40), (512, 100)])
def test_cores_partition_extent(shape, tile, halo):
    plan = plan_tiles(shape, tile=tile, halo=min(halo, tile), size_divisor=16)
    cover = np.zeros(shape, np.int32)
    for t in plan:
        y0, x0, y1, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert t.outer[2] - t.outer[0] == plan.input_size
        assert t.outer[0] <= y0 - plan.halo and t.outer[2] >= y1 + plan.halo
        assert t.outer[1] <= x0 - plan.halo and t.outer[3] >= x1 + plan.halo
    assert (cover == 1).all()
    assert plan.input_size % 16 == 0


def test_every_point_has_exactly_one_owner():
    plan = plan_tiles((300, 500), tile=128, halo=20)
    rng = np.random.default_rng(0)
    pts = rng.uniform([-10, -10], [310, 510], size=(5000, 2))
    owners = plan.owners(pts[:, 0], pts[:, 1])
    for (y, x), o in zip(pts, owners, strict=True):
        inside = [t.index for t in plan if t.core[0] <= y < t.core[2] and t.core[1] <= x < t.core[3]]
        assert inside == ([] if o == -1 else [o])
        assert plan.owner(y, x) == (None if o == -1 else o)


def test_outer_boxes_only_reach_neighbours():
    plan = plan_tiles((1000, 1000), tile=200, halo=150)
    for t in plan:
        touched = {u.index for u in plan if intersect(t.outer, u.core)}
        assert touched <= set(plan.neighbours(t.index))


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="empty"):
        plan_tiles((0, 10), tile=64, halo=0)
    with pytest.raises(ValueError, match="exceeds tile"):
        plan_tiles((1000, 1000), tile=64, halo=100)
    # a single tile may have any halo
    assert len(plan_tiles((50, 50), tile=512, halo=100)) == 1


@pytest.mark.parametrize("shape", [(6000, 6000), (3000, 9100), (1200, 800), (20000, 500)])
@pytest.mark.parametrize("tile,halo,div", [(768, 144, 16), (768, 364, 32), (1536, 272, 32)])
def test_auto_tile_never_reads_more_and_respects_the_input_cap(shape, tile, halo, div):
    from napari_hemato.core.tiling import MAX_AUTO_INPUT, auto_tile, input_side

    def pixels(t):
        return math.ceil(shape[0] / t) * math.ceil(shape[1] / t) * input_side(t, halo, div) ** 2

    t = auto_tile(shape, tile=tile, halo=halo, size_divisor=div)
    assert t >= tile and pixels(t) <= pixels(tile) and (t - tile) % div == 0
    assert t == tile or input_side(t, halo, div) <= MAX_AUTO_INPUT
    plan = plan_tiles(shape, tile=t, halo=halo, size_divisor=div)  # a valid plan
    assert plan.input_size == input_side(min(t, max(shape)), halo, div)
