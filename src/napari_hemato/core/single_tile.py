"""An image that fits in one tile, fed with only the padding its objects need.

The tile plan feeds every tile the same square input, ``tile + 2 * halo`` rounded up
to the model's ``size_divisor`` (:mod:`napari_hemato.core.tiling`). For one tile of a
large slide that is context; for a small image (a 640×480 smear field is 320×240 px
on the smear model's grid, its halo 364 px) it is 14× the image's pixels of padding,
and the network spends nearly all its time on it.

When the extent is a single tile of an instance model, the engine reads a *tight*
box instead: the extent grown by ``margin`` px on each side, ``margin`` the smallest
value of at least receptive field + post-processing reach + :data:`OVERHANG`
(congruent to the halo modulo ``size_divisor``, so the network's pooling grid sits on
the image exactly as before). Every output within ``margin - receptive_field_px`` px
of the extent (the *exact zone*) then sees the same input as in the full box and gets
the same bits (checked on real fields in the tests).

The halo's other part (the largest object) is there for objects reaching out of the
extent. The tight result is kept only when :func:`sealed` shows the foreground leaves
the extent by less than the exact zone minus the post-processing reach: every object
touching the image is then wholly in the exact zone, seen by the post-processing
exactly as in the full box, and separated from anything further out by a ring of
background. Otherwise the tile is predicted again on the full box: the result is the
general path's, only slower.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from napari_hemato.core.tiling import Box, Tile, TilePlan

log = logging.getLogger(__name__)

#: how far (px) the foreground may leave the extent and the tight box still be used
OVERHANG = 16


def postprocess_reach(spec, mpp: float) -> int:
    """Largest window (px, beyond a pixel) the instance post-processing looks at.

    Seeds are peaks of the distance map within ``min_distance_um`` (a square
    maximum filter), or h-maxima (a 3×3 neighbourhood; the rest follows the mask).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> postprocess_reach(SimpleNamespace(postprocess={"min_distance_um": 2.0}), 0.16)
    12
    >>> postprocess_reach(SimpleNamespace(postprocess={"seed_h": 1.0}), 0.5)
    1
    """
    pp = spec.postprocess
    if pp.get("seed_h"):
        return 1
    return max(int(round(float(pp.get("min_distance_um", 2.0)) / mpp)), 1)


def tight_margin(spec, mpp: float) -> int | None:
    """Padding (px) of a single tile's tight box, None when it would not be smaller.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> spec = SimpleNamespace(kind="instances", receptive_field_px=189, size_divisor=32,
    ...                        halo=364, postprocess={"min_distance_um": 2.0})
    >>> tight_margin(spec, 0.16)  # >= 189 + 12 + 16 + 1, = 364 (mod 32)
    236
    """
    if spec.kind != "instances":
        return None
    d = max(int(spec.size_divisor), 1)
    need = int(spec.receptive_field_px) + postprocess_reach(spec, mpp) + OVERHANG + 1
    margin = need + (int(spec.halo) - need) % d
    return margin if margin < spec.halo else None


def tight_outer(plan: TilePlan, tile: Tile, margin: int, divisor: int) -> Box:
    """The extent grown by ``margin`` on each side, rounded up to ``divisor``."""
    h, w = plan.shape
    hh = -(-(h + 2 * margin) // divisor) * divisor
    ww = -(-(w + 2 * margin) // divisor) * divisor
    return (-margin, -margin, hh - margin, ww - margin)


def sealed(foreground: np.ndarray, shape: tuple[int, int], margin: int, spec, mpp: float) -> bool:
    """Whether the tight box's result is the full box's (see the module docstring).

    ``foreground`` covers the tight box (the extent ``shape`` starts at ``margin``); no
    foreground pixel may lie ``limit`` px or more beyond the extent, ``limit`` the exact
    zone minus the post-processing reach.
    """
    limit = margin - int(spec.receptive_field_px) - postprocess_reach(spec, mpp)
    if limit < 1:
        return False
    mask = foreground > float(spec.postprocess.get("threshold", 0.5))
    h, w = shape
    lo = margin - limit + 1
    near = mask[max(lo, 0) : margin + h + limit - 1, max(lo, 0) : margin + w + limit - 1]
    return int(near.sum()) == int(mask.sum())


def predict_single_tile(predictor, grid, plan: TilePlan, tile: Tile, cancel, timings,
                        read) -> tuple[dict, Box, np.ndarray]:
    """``(outputs, box they cover, its image)`` of the one tile of ``plan``: the tight box
    when :func:`sealed`, else the plan's full outer box. ``read(box)`` reads one work-grid
    box."""
    spec = predictor.spec
    margin = tight_margin(spec, grid.mpp)
    boxes = [tile.outer] if margin is None else [
        tight_outer(plan, tile, margin, max(int(spec.size_divisor), 1)), tile.outer]
    for box in boxes:
        t = time.perf_counter()
        image = read(box)
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        raw = predictor.predict(image[None], cancel=cancel)
        timings["predict"] = timings.get("predict", 0.0) + time.perf_counter() - t
        if box != tile.outer and not sealed(raw["foreground"][0, 0], plan.shape, margin, spec,
                                            grid.mpp):
            log.debug("foreground leaves the tight box's exact zone: predicting the full box")
            continue
        break
    return raw, box, image
