"""Which of many points to draw for a view: every point in view when few, else a thinning.

A million mitosis candidates or nuclei centres cannot all be drawn at every zoom (software
OpenGL takes seconds per frame; a GPU still wastes them on dots smaller than a pixel).
:func:`plan` draws only the points inside the view grown by a margin, and when more than
``budget`` of them are there, a stable fraction: point ``i`` is drawn when its rank
(:func:`point_ranks`, the fractional part of ``id × golden ratio``, an even spread over the
slide because ids follow the tiles) is below ``budget / n_in_view``. Zooming in raises the
fraction until every point is drawn; zooming out keeps the same points, so the picture does
not flicker. Points a person touched (provenance other than ``auto``) have rank -1 and are
always drawn.

:func:`still_covers` says whether a new view can keep the last plan (it lies inside the
planned box and is not much smaller), so a pan within the margin costs nothing.

>>> yx = np.array([[0.0, 0.0], [5.0, 5.0], [50.0, 50.0]])
>>> p = plan(yx, point_ranks(np.array([1, 2, 3])), ((0, 0), (10, 10)), budget=10, margin=0.0)
>>> p.shown.tolist(), p.n_in_box, p.fraction
([True, True, False], 2, 1.0)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: points drawn at most per view (software OpenGL on 2 cores: 10k in 0.08 s, 50k in 0.3 s,
#: 1M in 6 s per frame, measured on a busy machine)
DEFAULT_BUDGET = 25_000
#: the view is grown by this fraction of its size on every side (pans inside cost nothing)
DEFAULT_MARGIN = 0.5
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


class Plan(NamedTuple):
    shown: np.ndarray  # (n,) bool: which points to draw
    box: np.ndarray  # [[y0, x0], [y1, x1]]: the view grown by the margin
    fraction: float  # the share of the points in the box that is drawn (1.0: all)
    n_in_box: int
    view_area: float  # area of the view the plan was made for


def point_ranks(ids: np.ndarray, provenance: np.ndarray | None = None) -> np.ndarray:
    """A rank in [0, 1) per point, from its id (a Weyl sequence: stable, evenly spread); -1
    for points whose ``provenance`` is not ``auto`` (corrected or added by a person)."""
    ranks = np.modf(np.asarray(ids, np.float64) * GOLDEN)[0]
    ranks = np.where(np.isfinite(ranks), np.abs(ranks), 0.0)
    if provenance is not None:
        ranks[np.asarray(provenance).astype(str) != "auto"] = -1.0
    return ranks


def plan(yx: np.ndarray, ranks: np.ndarray, view, *, budget: int = DEFAULT_BUDGET,
         margin: float = DEFAULT_MARGIN) -> Plan:
    """The points to draw for ``view`` (``[[y0, x0], [y1, x1]]``, in the points' coordinates)."""
    view = np.sort(np.asarray(view, float), axis=0)
    pad = (view[1] - view[0]) * margin
    box = np.array([view[0] - pad, view[1] + pad])
    y, x = yx[:, 0], yx[:, 1]
    inside = (y >= box[0, 0]) & (y <= box[1, 0]) & (x >= box[0, 1]) & (x <= box[1, 1])
    n = int(inside.sum())
    fraction = 1.0 if n <= budget else budget / n
    shown = inside if fraction >= 1.0 else inside & (ranks < fraction)
    area = float(np.prod(view[1] - view[0]))
    return Plan(shown, box, fraction, n, area)


def still_covers(last: Plan | None, view, *, zoom_step: float = 2.0) -> bool:
    """Whether ``last`` still serves ``view``: the view is inside its box and, when it thinned,
    the view is not ``zoom_step``² times smaller (zooming in that far must show more points)."""
    if last is None:
        return False
    view = np.sort(np.asarray(view, float), axis=0)
    if np.any(view[0] < last.box[0]) or np.any(view[1] > last.box[1]):
        return False
    area = float(np.prod(view[1] - view[0]))
    return last.fraction >= 1.0 or area * zoom_step**2 >= last.view_area
