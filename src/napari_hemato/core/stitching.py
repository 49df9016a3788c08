"""Stitching: tile fragments -> one global label image; points -> global NMS.

Each labels chunk (one tile core) is assembled from the fragments of the up to
3×3 tiles around it, once all of them are done. Fragments only hold objects
their tile owns, so no object appears twice; objects are never cut, because a
tile's fragment extends over its halo into neighbouring cores. Where two
fragments claim the same pixel (rare: only where post-processing differs
between tiles), the lower tile index wins, so the result does not depend on
the order tiles finished in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial import cKDTree

from napari_hemato.core.objects import TileOutput
from napari_hemato.core.tiling import TilePlan, intersect


def assemble_chunk(
    index: int, plan: TilePlan, read_tile: Callable[[int], TileOutput]
) -> np.ndarray:
    """The final labels of tile ``index``'s core from its neighbours' fragments."""
    core = plan[index].core
    out = np.zeros((core[2] - core[0], core[3] - core[1]), np.uint32)
    for n in plan.neighbours(index):
        frag = read_tile(n)
        if frag.fragment is None:
            continue
        overlap = intersect(core, frag.box)
        if overlap is None:
            continue
        src = frag.fragment[
            overlap[0] - frag.box[0] : overlap[2] - frag.box[0],
            overlap[1] - frag.box[1] : overlap[3] - frag.box[1],
        ]
        dst = out[overlap[0] - core[0] : overlap[2] - core[0], overlap[1] - core[1] : overlap[3] - core[1]]
        free = (dst == 0) & (src != 0)
        dst[free] = src[free]
    return out


def ready_chunks(changed: int, plan: TilePlan, done: set[int], assembled: set[int]) -> list[int]:
    """Chunks that can be assembled now that tile ``changed`` is done."""
    return [
        c for c in plan.neighbours(changed)
        if c not in assembled and all(n in done for n in plan.neighbours(c))
    ]


def nms_points(yx: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of points kept by greedy non-maximum suppression (best score first).

    Examples
    --------
    >>> nms_points(np.array([[0, 0], [0, 1.5], [10, 10]]), np.array([0.9, 0.8, 0.7]), 2.0).tolist()
    [0, 2]
    """
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    n = len(yx)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
    tree = cKDTree(yx)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[tree.query_ball_point(yx[i], radius)] = True
    return np.sort(np.asarray(keep, np.int64))
