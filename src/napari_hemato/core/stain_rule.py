"""Re-type small objects by their stain: small purple blobs on a smear are platelets.

A detector trained on one lab's platelets (BCCD's are 5–14 µm²) calls a smaller
platelet (1–3 µm², common in other labs' smears) a small red cell, or finds it
too small to keep. Stain tells them apart where size and the network do not: in a
Romanowsky-stained smear a platelet's granules are purple (blue over red) and a red
cell is pink (red over blue), whatever the lab's exact shade. The rule compares an
object's mean blue minus red with the glass just around it, so a warmer or cooler
stain (or uneven illumination) moves both together.

A spec turns it on in its ``postprocess`` (the bundled smear model's,
:data:`PLATELET_RULE`)::

    "stain_rule": {"to": "Platelets", "from": ["RBC"], "min_area_um2": 0.5,
                   "max_area_um2": 8.0, "min_blue_over_red": 2.0, "min_over_red_cells": 12.0}

Objects between ``min_area_um2`` and ``max_area_um2`` whose most probable class is
in ``from`` and whose blue-over-red exceeds the glass's by ``min_blue_over_red``
(0–255 units) and the tile's red cells' by ``min_over_red_cells`` become ``to``. The
second reference is there for labs whose red cells are themselves purple-toned next
to the glass (BCCD's): a piece of a red cell's rim is then as purple as the glass
reference asks, but not more purple than the red cells. Their probabilities stay the network's (the table's
``confidence`` is then the network's probability of ``to``: low, so the review
queue's "uncertain first" shows them early). Objects smaller than the spec's own
``min_area_um2`` that the rule does not re-type are dropped, as without the rule.
Objects touching the image's (or region's) edge are never re-typed: a red cell cut
by the edge can be as small as a platelet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the bundled smear model's rule (thresholds chosen by looking at the re-typed objects on
#: the sample field and BCCD's validation fields; see its model card)
PLATELET_RULE = {"to": "Platelets", "from": ["RBC"], "min_area_um2": 0.5, "max_area_um2": 8.0,
                 "min_blue_over_red": 2.0, "min_over_red_cells": 12.0}
_KEYS = {"to", "from", "min_area_um2", "max_area_um2", "min_blue_over_red", "min_over_red_cells"}

#: the glass: pixels the network calls background with this confidence
GLASS_FOREGROUND = 0.2
#: fewer glass pixels than this around an object: no reference, the object stays as it is
MIN_GLASS_PIXELS = 20
#: how far around an object its glass is looked for (µm)
GLASS_MARGIN_UM = 2.5
#: objects of a source class at least this large are the red cells of the reference (µm²)
RED_CELL_MIN_UM2 = 20.0
#: fewer red cells than this in a tile: no red-cell reference, the glass alone decides
MIN_RED_CELLS = 3


@dataclass(frozen=True)
class StainRule:
    """A spec's ``postprocess["stain_rule"]``, checked against its class names."""

    to: int
    sources: tuple[int, ...]
    min_area_um2: float
    max_area_um2: float
    min_blue_over_red: float
    min_over_red_cells: float = 0.0

    @classmethod
    def from_spec(cls, postprocess: dict, class_names) -> StainRule | None:
        """The rule of a spec's ``postprocess`` (None when it has none).

        Examples
        --------
        >>> r = StainRule.from_spec({"stain_rule": {"to": "Platelets", "from": ["RBC"]}},
        ...                         ["RBC", "WBC", "Platelets"])
        >>> r.to, r.sources
        (2, (0,))
        """
        raw = postprocess.get("stain_rule")
        if not raw:
            return None
        if set(raw) - _KEYS:
            raise ValueError(f"postprocess stain_rule: unknown keys {sorted(set(raw) - _KEYS)} "
                             f"(known: {sorted(_KEYS)})")
        names = [str(c) for c in class_names]
        wanted = [raw.get("to"), *raw.get("from", [])]
        unknown = [c for c in wanted if c not in names]
        if unknown or not raw.get("from"):
            raise ValueError(f"postprocess stain_rule: classes {unknown or wanted} are not among the "
                             f"model's {names} (it needs 'to' and a non-empty 'from')")
        rule = cls(
            to=names.index(raw["to"]),
            sources=tuple(names.index(c) for c in raw["from"]),
            min_area_um2=float(raw.get("min_area_um2", 0.5)),
            max_area_um2=float(raw.get("max_area_um2", 8.0)),
            min_blue_over_red=float(raw.get("min_blue_over_red", 4.0)),
            min_over_red_cells=float(raw.get("min_over_red_cells", 0.0)),
        )
        if not 0 < rule.min_area_um2 < rule.max_area_um2:
            raise ValueError(f"postprocess stain_rule: need 0 < min_area_um2 < max_area_um2, got "
                             f"{rule.min_area_um2} and {rule.max_area_um2}")
        return rule


def blue_over_red(image: np.ndarray, labels: np.ndarray, foreground: np.ndarray,
                  bbox: np.ndarray, candidates: np.ndarray, margin_px: int) -> np.ndarray:
    """Per object: mean (blue − red) minus that of the glass around it (NaN: not measured).

    Only ``candidates`` (object indices, 0-based for labels ``1..n``) are measured, each
    in its ``bbox`` (n, 4; half-open, labels' coordinates) grown by ``margin_px``; the
    glass is that window's pixels the network calls background (foreground below
    :data:`GLASS_FOREGROUND`). Local, so a slide's uneven illumination does not matter
    and the result does not depend on the tiling (the halo holds the window). Fewer
    than :data:`MIN_GLASS_PIXELS` glass pixels: NaN, the object is left as it is.

    Examples
    --------
    >>> img = np.full((12, 12, 3), 200, np.uint8); img[5:7, 5:7] = (150, 100, 180)  # purple
    >>> lab = np.zeros((12, 12), np.int32); lab[5:7, 5:7] = 1
    >>> blue_over_red(img, lab, (lab > 0) * 1.0, np.array([[5, 5, 7, 7]]), np.array([0]), 4)
    array([30.])
    """
    out = np.full(len(bbox), np.nan)
    h, w = labels.shape
    for i in np.asarray(candidates, int):
        y0, x0, y1, x1 = (int(v) for v in bbox[i])
        win = np.s_[max(y0 - margin_px, 0): min(y1 + margin_px, h),
                    max(x0 - margin_px, 0): min(x1 + margin_px, w)]
        rgb = image[win].astype(np.float64)
        diff = rgb[..., 2] - rgb[..., 0]
        glass = foreground[win] < GLASS_FOREGROUND
        mine = labels[win] == i + 1
        if glass.sum() >= MIN_GLASS_PIXELS and mine.any():
            out[i] = float(diff[mine].mean() - np.median(diff[glass]))
    return out


def object_blue_over_red(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean (blue − red) of each object ``1..n`` of ``labels`` (NaN for an empty label)."""
    diff = image[..., 2].astype(np.float64) - image[..., 0].astype(np.float64)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:]
    total = np.bincount(flat, diff.ravel(), minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def red_cell_reference(rule: StainRule, prob: np.ndarray, area_um2: np.ndarray,
                       object_colour: np.ndarray) -> float:
    """Median of the tile's red cells' :func:`object_blue_over_red` (NaN: fewer than
    :data:`MIN_RED_CELLS`): objects of a source class at least :data:`RED_CELL_MIN_UM2`.

    A platelet is purple next to the red cells of its own smear, and a piece of a red
    cell (its rim, cut off by the segmentation) is not, however purple that lab's red
    cells are next to the glass. The red cells are those of the tile's extent (a smear
    tile of 768 px holds a hundred or more), so two tilings of a field can differ for an
    object within a unit of the threshold; the glass reference is local and exact.
    """
    if not len(prob):
        return float("nan")
    red = (np.isin(prob.argmax(axis=1), rule.sources) & (area_um2 >= RED_CELL_MIN_UM2)
           & np.isfinite(object_colour))
    return float(np.median(object_colour[red])) if red.sum() >= MIN_RED_CELLS else float("nan")


def candidates(rule: StainRule, prob: np.ndarray, area_um2: np.ndarray,
               whole: np.ndarray | None = None) -> np.ndarray:
    """Indices of the objects the rule looks at: of a source class, in the rule's size range
    and (with ``whole``) shown whole by the image. (Objects the network already calls ``to``
    but smaller than the spec's ``min_area_um2`` stay dropped: on BCCD's held-out fields
    keeping the purple ones added 8 unboxed platelets and found none of the missed.)"""
    hit = (np.isin(prob.argmax(axis=1), rule.sources) & (area_um2 >= rule.min_area_um2)
           & (area_um2 <= rule.max_area_um2)) if len(prob) else np.zeros(0, bool)
    if whole is not None:
        hit &= np.asarray(whole, bool)
    return np.flatnonzero(hit)


def retype(rule: StainRule, prob: np.ndarray, area_um2: np.ndarray,
           contrast: np.ndarray | None, whole: np.ndarray | None = None,
           over_red_cells: np.ndarray | None = None) -> np.ndarray:
    """Class index per object: ``rule.to`` where the rule re-types it, else -1.

    ``contrast``: blue over red minus the glass's (:func:`blue_over_red`). ``whole``
    (bool per object): objects the image shows whole. A red cell cut by the image's
    edge is as small as a platelet; only whole objects are re-typed. ``over_red_cells``:
    each object's :func:`object_blue_over_red` minus the tile's red cells'
    (:func:`red_cell_reference`); where known (finite), a re-typed object must reach
    ``rule.min_over_red_cells`` there too.

    Examples
    --------
    >>> rule = StainRule(to=2, sources=(0,), min_area_um2=0.5, max_area_um2=8.0,
    ...                  min_blue_over_red=4.0)
    >>> prob = np.array([[0.9, 0.05, 0.05]] * 3)
    >>> retype(rule, prob, np.array([2.0, 2.0, 30.0]), np.array([10.0, -15.0, 10.0])).tolist()
    [2, -1, -1]
    """
    out = np.full(len(prob), -1, np.int64)
    if contrast is None or not len(prob):
        return out
    idx = candidates(rule, prob, area_um2, whole)
    c = np.asarray(contrast, np.float64)[idx]
    hit = np.isfinite(c) & (c >= rule.min_blue_over_red)
    if over_red_cells is not None:
        r = np.asarray(over_red_cells, np.float64)[idx]
        hit &= ~np.isfinite(r) | (r >= rule.min_over_red_cells)
    out[idx[hit]] = rule.to
    return out


def stain_classes(rule: StainRule, image: np.ndarray, labels: np.ndarray, foreground: np.ndarray,
                  prob: np.ndarray, area_um2: np.ndarray, bbox: np.ndarray, whole: np.ndarray,
                  mpp: float) -> np.ndarray:
    """The rule's class per object of ``labels`` (``1..n``; -1: the network's argmax).

    ``image``: the tile's RGB on ``labels``' grid (``mpp`` µm/px); ``prob``, ``area_um2``,
    ``bbox`` (half-open, ``labels``' coordinates): per object; ``whole``: objects the rule
    may re-type (shown whole, owned by the tile).
    """
    look = candidates(rule, prob, area_um2, whole)
    contrast = blue_over_red(image, labels, foreground, bbox, look, int(round(GLASS_MARGIN_UM / mpp)))
    colour = object_blue_over_red(image, labels, len(prob))
    over_red = colour - red_cell_reference(rule, prob, area_um2, colour)
    return retype(rule, prob, area_um2, contrast, whole, over_red)
