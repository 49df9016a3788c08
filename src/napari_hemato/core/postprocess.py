"""Turn dense network outputs into instances and points.

Every operation here is *local* (a pixel's result depends only on a window of
bounded size around it), so running it on a tile with a large enough halo gives
exactly the result of running it on the whole image. The engine relies on this.

:func:`distance_target` goes the other way (instances to the ``distance`` map the
segmenters are trained on); training and the nucleus fine-tune both use it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import local_maxima
from skimage.segmentation import watershed


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-object Euclidean distance to the object's border, scaled to max 1.

    Touching objects are separated (each object's distance is computed on its
    own mask), so the map dips to ~0 between them: its local maxima give one
    watershed seed per object.
    """
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        m = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        top = d.max()
        if top > 0:
            out[sl][m] = (d[m] / top).astype(np.float32)
    return out


def _local_peaks(values: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """Label image of local-maximum plateaus of ``values`` inside ``mask``.

    The maximum filter runs on the box around ``mask`` grown by the radius only (with
    ``mode="nearest"`` a window cut by the image edge has the same maximum as one cut by
    that box where the box meets the edge): a detector's heatmap is mostly below its
    threshold, and a tile with nothing above it costs nothing.

    Examples
    --------
    >>> v = np.zeros((9, 12)); v[2, 3] = 0.9; v[2, 5] = 0.8; v[7, 10] = 0.7
    >>> int(_local_peaks(v, v > 0.5, 1).max()), int(_local_peaks(v, v > 0.5, 2).max())
    (3, 2)
    """
    size = 2 * max(int(radius), 1) + 1
    peaks = np.zeros(mask.shape, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
        r = size // 2
        box = np.s_[max(rows[0] - r, 0) : rows[-1] + r + 1, max(cols[0] - r, 0) : cols[-1] + r + 1]
        sub = values[box]
        peaks[box] = (sub == ndi.maximum_filter(sub, size=size, mode="nearest")) & mask[box]
    markers, _ = ndi.label(peaks, structure=np.ones((3, 3), bool))
    return markers


# the four forward 8-neighbour offsets, as (a rows, a cols, b rows, b cols) slices
_NEIGHBOUR_PAIRS = (
    (slice(None), slice(None, -1), slice(None), slice(1, None)),
    (slice(None, -1), slice(None), slice(1, None), slice(None)),
    (slice(None, -1), slice(None, -1), slice(1, None), slice(1, None)),
    (slice(None, -1), slice(1, None), slice(1, None), slice(None, -1)),
)


def _dynamics(values: np.ndarray, h: float, inside: np.ndarray, floor: float = 0.0):
    """The maxima of ``values`` (zero outside ``inside``), their basins and their dynamics.

    A watershed from every local-maximum plateau gives basins; the highest pass
    between each pair of touching basins is the largest ``min`` over their
    8-adjacent pixel pairs, and Kruskal's merge in order of falling passes gives
    each maximum its dynamic (top minus the pass where it meets a higher one)
    and the maximum it drains into there. This is the h-maxima transform without
    its global pixel sort.

    Returns ``(seeds, basins, killed, target)``: the seed plateaus (labelled 1..n)
    and their basins; ``killed[s]`` for the seeds whose dynamic or top is at most
    ``h`` (they meet the background at 0), or whose top is at most ``floor``;
    ``target[s]``, the seed a killed seed drains into (itself when it is the top of
    its piece of ``inside``).
    """
    v = np.where(inside, values, 0).astype(np.float32)
    peaks = local_maxima(v, connectivity=2, allow_borders=True) & inside
    seeds, n = ndi.label(peaks, structure=np.ones((3, 3), bool))
    top = np.zeros(n + 1, np.float32)
    top[seeds[peaks]] = v[peaks]  # a seed is a plateau: its pixels share one value
    killed = (top <= h) | (top <= floor)
    killed[0] = False
    target = np.arange(n + 1)
    if n == 0:
        return seeds, seeds, killed, target
    basins = watershed(-v, seeds, mask=inside, connectivity=2)
    if n == 1:
        return seeds, basins, killed, target
    keys, passes = [], []
    for a0, a1, b0, b1 in _NEIGHBOUR_PAIRS:
        la, lb = basins[a0, a1], basins[b0, b1]
        cross = (la != lb) & (la > 0) & (lb > 0)
        if cross.any():
            x, y = la[cross].astype(np.int64), lb[cross].astype(np.int64)
            keys.append(np.minimum(x, y) * (n + 1) + np.maximum(x, y))
            passes.append(np.minimum(v[a0, a1][cross], v[b0, b1][cross]))
    if not keys:
        return seeds, basins, killed, target
    keys, passes = np.concatenate(keys), np.concatenate(passes)
    order = np.lexsort((-passes, keys))
    keys, passes = keys[order], passes[order]
    first = np.r_[True, keys[1:] != keys[:-1]]  # the highest pass of each basin pair
    keys, passes = keys[first], passes[first]
    order = np.argsort(-passes, kind="stable")
    parent = list(range(n + 1))
    ctop = top.tolist()  # top of each merged component (at its root)
    rep = list(range(n + 1))  # the seed holding that top
    dead = killed.tolist()
    into = target.tolist()

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key, pass_ in zip(keys[order].tolist(), passes[order].tolist(), strict=True):
        ra, rb = find(key // (n + 1)), find(key % (n + 1))
        if ra == rb:
            continue
        lo, hi = (ra, rb) if ctop[ra] < ctop[rb] else (rb, ra)
        if ctop[lo] - pass_ <= h or dead[rep[lo]]:
            dead[rep[lo]] = True
            into[rep[lo]] = rep[hi]
        parent[lo] = hi
    return seeds, basins, np.array(dead), np.array(into)


def _h_maxima_markers(values: np.ndarray, h: float, inside: np.ndarray,
                      seed_mask: np.ndarray) -> np.ndarray:
    """Label image of the maxima of ``values`` whose dynamic is at least ``h``.

    The result equals the regional maxima of the grey reconstruction of
    ``values - h`` under ``values`` (the h-maxima transform, with ``values``
    zero outside ``inside``), computed by :func:`_dynamics`. Maxima with a dynamic
    of at most ``h``, or a top of at most ``h``, are dropped; the survivors keep their
    plateaus, cut by ``seed_mask``. 30x faster than
    ``skimage.morphology.reconstruction`` on a 1056 px tile. Unlike the
    reconstruction, a component whose every peak is below ``h`` gives no marker, so
    the result stays local.

    Examples
    --------
    >>> yy, xx = np.mgrid[:9, :15]
    >>> two = np.maximum(1 - np.hypot(yy - 4, xx - 4) / 5, 0.9 - np.hypot(yy - 4, xx - 10) / 5)
    >>> inside = two > 0
    >>> [int(_h_maxima_markers(two, h, inside, inside).max()) for h in (0.1, 0.5)]
    [2, 1]
    """
    seeds, _, killed, _ = _dynamics(values, h, inside)
    kept = np.where(killed[seeds], 0, seeds) * seed_mask
    markers, _ = ndi.label(kept > 0, structure=np.ones((3, 3), bool))
    return markers


def _h_maxima_regions(values: np.ndarray, h: float, inside: np.ndarray,
                      floor: float = 0.0) -> np.ndarray:
    """Regions of ``inside``: one per maximum of ``values`` with a dynamic above ``h``.

    The basins of :func:`_dynamics`, each killed maximum's basin merged into the
    basin it drains into (the merge of a watershed by dynamics): what a
    watershed from :func:`_h_maxima_markers` gives, at the cost of one watershed
    instead of two. Maxima with a top of at most ``floor`` merge too; a piece of
    ``inside`` whose every maximum is killed is left 0. Labels are the surviving
    seeds' numbers (not consecutive).

    Examples
    --------
    >>> yy, xx = np.mgrid[:9, :15]
    >>> two = np.maximum(1 - np.hypot(yy - 4, xx - 4) / 5, 0.9 - np.hypot(yy - 4, xx - 10) / 5)
    >>> inside = two > 0
    >>> [len(np.unique(_h_maxima_regions(two, h, inside))) - 1 for h in (0.1, 0.5)]
    [2, 1]
    >>> bool((_h_maxima_regions(two, 0.5, inside) > 0).sum() == inside.sum())
    True
    """
    seeds, basins, killed, target = _dynamics(values, h, inside, floor)
    final = np.where(killed, target, np.arange(killed.size))
    while True:  # follow each killed seed down the chain to a surviving one
        hop = killed[final] & (target[final] != final)
        if not hop.any():
            break
        final[hop] = target[final[hop]]
    final[killed[final]] = 0  # the top of its piece was killed: no object there
    final[0] = 0
    return final[basins]


def instances_from_maps(
    foreground: np.ndarray,
    distance: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    min_distance_px: float = 3,
    min_area_px: float = 10,
    seed_threshold: float | None = None,
    whole: np.ndarray | None = None,
    min_whole_area_px: float = 0,
    seed_h: float | None = None,
) -> np.ndarray:
    """Instance labels from a foreground probability and a distance map.

    Seeds are local maxima of the distance map (the Euclidean distance
    transform of the thresholded foreground when no map is given); a
    marker-controlled watershed grows them inside the foreground, which
    splits touching objects.

    Foreground pixels in ``whole`` (e.g. those a smear model calls white
    cells) are not split: each connected piece of them, holes filled, is one
    object (a lobed nucleus or a ragged cytoplasm gives the distance map
    several peaks, which would cut one cell into many), and pieces smaller
    than ``min_whole_area_px`` are dropped. The watershed splits the rest.

    Parameters
    ----------
    foreground : (H, W) float array
        Probability that a pixel belongs to an object.
    distance : (H, W) float array, optional
        Predicted distance-to-boundary (any positive scale).
    threshold : float
        Foreground probability cut-off.
    min_distance_px : float
        Minimum distance between seeds, in pixels.
    min_area_px : float
        Objects smaller than this are removed.
    seed_threshold : float, optional
        Seeds must have ``distance`` above this (default: 0, i.e. any).
    seed_h : float, optional
        Use the *h-maxima* of the distance map as seeds instead of local
        maxima ``min_distance_px`` apart: a peak must rise ``seed_h`` above
        the saddle to its neighbour, so an elongated nucleus with two shallow
        peaks stays one object while two touching nuclei (a deep saddle) are
        split, whatever their distance. Computed as one watershed from every
        maximum whose basins merge by their dynamics (:func:`_h_maxima_regions`);
        ``seed_threshold`` then merges the basins of maxima no higher than it.
    whole : (H, W) bool array, optional
        Pixels whose connected pieces are whole objects (see above).
    min_whole_area_px : float
        Smallest piece of ``whole`` kept.

    Returns
    -------
    (H, W) int32 array, 0 = background, objects numbered 1..n (in seed order).

    Examples
    --------
    >>> fg = np.zeros((20, 20)); fg[2:8, 2:8] = 1; fg[10:18, 10:18] = 1
    >>> int(instances_from_maps(fg).max())
    2
    >>> yy, xx = np.mgrid[:20, :34]  # two touching discs ...
    >>> fg = (((yy - 10) ** 2 + (xx - 9) ** 2) < 64) | (((yy - 10) ** 2 + (xx - 24) ** 2) < 64)
    >>> int(instances_from_maps(fg.astype(float), min_distance_px=4).max())
    2
    >>> int(instances_from_maps(fg.astype(float), min_distance_px=4, whole=fg).max())  # ... or one
    1
    >>> d = ndi.distance_transform_edt(fg)
    >>> [int(instances_from_maps(fg.astype(float), d, seed_h=h).max()) for h in (0.5, 4.0)]
    [2, 1]
    """
    fg = np.asarray(foreground, dtype=np.float32)
    mask = fg > threshold
    if not mask.any():
        return np.zeros(fg.shape, np.int32)
    pieces, n_whole = None, 0
    if whole is not None:
        w = ndi.binary_fill_holes(mask & np.asarray(whole, bool))
        pieces, n_whole = ndi.label(w, structure=np.ones((3, 3), bool))
        if n_whole:
            sizes = np.bincount(pieces.ravel())
            small = sizes < max(min_whole_area_px, 1)
            small[0] = False
            pieces[small[pieces]] = 0
            w = pieces > 0
            mask = mask & ~w
    if distance is None:
        dist = ndi.distance_transform_edt(mask).astype(np.float32)
    else:
        dist = np.asarray(distance, dtype=np.float32)
    if seed_h:  # one watershed, its basins merged by dynamics
        labels = _h_maxima_regions(dist, float(seed_h), mask, float(seed_threshold or 0.0))
    else:
        markers = _local_peaks(dist, mask & (dist > (seed_threshold or 0.0)),
                               int(round(min_distance_px)))
        labels = watershed(-dist, markers, mask=mask)
    labels = labels.astype(np.int32)
    if n_whole:
        top = int(labels.max())
        labels[pieces > 0] = pieces[pieces > 0] + top
    areas = np.bincount(labels.ravel())
    keep = areas >= max(min_area_px, 1)
    keep[0] = False
    lut = np.zeros(areas.size, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def points_from_heatmap(
    heatmap: np.ndarray,
    *,
    threshold: float = 0.5,
    min_distance_px: float = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of a centre heatmap as ``(coords (n, 2) float, scores (n,))``.

    A plateau of equal maxima gives one point at its centroid.

    Examples
    --------
    >>> h = np.zeros((9, 9)); h[4, 4] = 0.9
    >>> coords, scores = points_from_heatmap(h)
    >>> coords.tolist(), [round(float(v), 2) for v in scores]
    ([[4.0, 4.0]], [0.9])
    """
    h = np.asarray(heatmap, dtype=np.float32)
    markers = _local_peaks(h, h > threshold, int(round(min_distance_px)))
    n = int(markers.max())
    if n == 0:
        return np.zeros((0, 2), np.float64), np.zeros(0, np.float32)
    idx = np.arange(1, n + 1)
    coords = np.asarray(ndi.center_of_mass(np.ones_like(h), markers, idx), dtype=np.float64)
    scores = np.asarray(ndi.maximum(h, markers, idx), dtype=np.float32)
    return coords.reshape(-1, 2), scores


def whole_class_mask(class_probs: np.ndarray | None, class_names, whole_classes) -> np.ndarray | None:
    """Pixels whose most probable class is one of ``whole_classes`` (None if none apply).

    Examples
    --------
    >>> p = np.array([[[0.9, 0.2]], [[0.1, 0.8]]])  # (C=2, H=1, W=2)
    >>> whole_class_mask(p, ["RBC", "WBC"], ["WBC"]).tolist()
    [[False, True]]
    """
    if class_probs is None or not whole_classes:
        return None
    names = list(class_names)
    unknown = set(whole_classes) - set(names)
    if unknown:
        raise ValueError(f"postprocess whole_classes {sorted(unknown)} not in class names {names}")
    best = np.argmax(np.asarray(class_probs), axis=0)
    return np.isin(best, [names.index(c) for c in whole_classes])


def postprocess_instances(
    spec_postprocess: dict, mpp: float, foreground: np.ndarray, distance: np.ndarray | None,
    class_probs: np.ndarray | None = None, class_names=(),
) -> np.ndarray:
    """:func:`instances_from_maps` with a spec's ``postprocess`` (µm) at ``mpp``.

    ``postprocess["whole_classes"]`` (with ``class_probs`` (C, H, W) and the
    spec's ``class_names``) names classes whose pixels form whole objects, at
    least ``whole_min_area_um2`` large.
    """
    pp = spec_postprocess
    return instances_from_maps(
        foreground,
        distance,
        threshold=float(pp.get("threshold", 0.5)),
        min_distance_px=float(pp.get("min_distance_um", 2.0)) / mpp,
        min_area_px=float(pp.get("min_area_um2", 5.0)) / mpp**2,
        seed_threshold=pp.get("seed_threshold"),
        seed_h=pp.get("seed_h"),
        whole=whole_class_mask(class_probs, class_names, pp.get("whole_classes")),
        min_whole_area_px=float(pp.get("whole_min_area_um2", 0.0)) / mpp**2,
    )


def postprocess_points(
    spec_postprocess: dict, mpp: float, heatmap: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`points_from_heatmap` with a spec's ``postprocess`` (µm) at ``mpp``."""
    pp = spec_postprocess
    return points_from_heatmap(
        heatmap,
        threshold=float(pp.get("threshold", 0.5)),
        min_distance_px=float(pp.get("min_distance_um", 5.0)) / mpp,
    )
