"""From one tile's network outputs to the objects that tile owns.

A tile keeps only objects whose centroid lies in its core (see
:mod:`napari_hemato.core.tiling`); their ids are globally unique
(``tile.index * id_stride + k``) so tiles can be processed in any order, on any
machine, and resumed. The result is a :class:`TileOutput`: a label fragment
over the tile's outer box (owned objects only) and a column table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.postprocess import postprocess_instances, postprocess_points
from napari_hemato.core.stain_rule import StainRule, stain_classes
from napari_hemato.core.tiling import Box, Tile, TilePlan, intersect

if TYPE_CHECKING:
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.spec import ModelSpec

#: raw table columns every tile writes (work-grid pixel coordinates, ROI-relative); instance
#: tiles run with a grid also write ``area_level0``: the object's pixel count on level 0
BASE_COLUMNS = ("id", "y", "x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "area_px", "score")


@dataclass
class TileOutput:
    """Objects owned by one tile.

    ``fragment`` covers ``box`` (the tile's outer box clipped to the extent)
    and holds the global ids of owned objects only (instances); ``columns``
    maps :data:`BASE_COLUMNS` and ``prob`` (n, n_classes) to arrays.
    """

    index: int
    box: Box
    fragment: np.ndarray | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return int(len(self.columns.get("id", ())))


def id_stride(n_tiles: int) -> int:
    """Ids per tile so that every id of ``n_tiles`` tiles fits in uint32."""
    stride = 1 << 20
    while stride > 256 and n_tiles * stride >= 2**32:
        stride >>= 1
    if n_tiles * stride >= 2**32:
        raise ValueError(f"{n_tiles} tiles are too many for uint32 labels; use a larger tile")
    return stride


def tile_objects(
    outputs: dict[str, np.ndarray], tile: Tile, plan: TilePlan, spec: ModelSpec, mpp: float,
    *, stride: int, grid: WorkGrid | None = None, image: np.ndarray | None = None,
    outer: Box | None = None,
) -> TileOutput:
    """Post-process one tile's outputs (role -> (C, H, W)) into owned objects.

    Objects are measured on the tile's pixels inside the extent only: the outer
    box's padding beyond the slide (or past the ROI) is no part of any object,
    whatever the network predicts there. With ``grid``, instances also get
    ``area_level0``, their pixel count in the level-0 label image. ``image``, the
    tile's (H, W, 3) input, serves a spec's stain rule
    (:mod:`napari_hemato.core.stain_rule`); without it the rule stays off. ``outer`` is
    the box the outputs (and ``image``) cover when it is not ``tile.outer`` (instances: a
    single tile read with less padding, :mod:`napari_hemato.core.single_tile`).
    """
    if spec.kind == "instances":
        return _instances(outputs, tile, plan, spec, mpp, stride, grid, outer or tile.outer, image)
    if spec.kind == "points":
        return _points(outputs, tile, plan, spec, mpp, stride)
    raise ValueError(f"model kind {spec.kind!r} cannot run on tiles")


def _class_probs(outputs, spec) -> np.ndarray | None:
    probs = outputs.get("class_probs")
    if probs is not None and probs.shape[0] != len(spec.class_names):
        raise ValueError(
            f"{spec.name}: class_probs has {probs.shape[0]} channels, spec has "
            f"{len(spec.class_names)} class names"
        )
    return probs


def _instances(outputs, tile, plan, spec, mpp, stride, grid, outer, image=None) -> TileOutput:
    fg = outputs["foreground"][0]
    dist = outputs["distance"][0] if "distance" in outputs else None
    probs = _class_probs(outputs, spec)
    pp = spec.postprocess
    min_area_um2 = float(pp.get("min_area_um2", 5.0))  # postprocess_instances' default
    rule = StainRule.from_spec(pp, spec.class_names) if image is not None else None
    if rule is not None:
        if probs is None:
            raise ValueError(f"{spec.name}: a stain_rule needs the model's class_probs")
        if image.shape[:2] != fg.shape:
            raise ValueError(f"{spec.name}: tile image {image.shape[:2]} and outputs {fg.shape} differ")
        # keep the rule's smaller objects until their stain is known
        pp = {**pp, "min_area_um2": min(min_area_um2, rule.min_area_um2)}
    labels = postprocess_instances(pp, mpp, fg, dist, probs, spec.class_names)
    box = intersect(tile.outer, (0, 0, *plan.shape))
    inside = np.s_[box[0] - outer[0] : box[2] - outer[0], box[1] - outer[1] : box[3] - outer[1]]
    labels, fg = labels[inside], fg[inside]
    probs = probs[(slice(None), *inside)] if probs is not None else None
    oy, ox = box[:2]
    n = int(labels.max())
    if n == 0:
        return _empty(tile, box, spec)
    # per-object sums over the labelled pixels only (a tenth of dense H&E): each label's
    # pixels are added in the same order as over the whole tile, so the same bits
    at = np.flatnonzero(labels)
    lab = labels.ravel()[at]
    row, col = np.divmod(at, labels.shape[1])
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    present = area > 0  # an object lying wholly in the padding has no pixel left
    per = np.maximum(area, 1.0)
    ty, tx = tile.outer[:2]  # sums of outer-box coordinates, as before the crop: same bits
    cy = np.bincount(lab, (row + (oy - ty)).astype(np.float64), minlength=n + 1)[1:] / per + ty
    cx = np.bincount(lab, (col + (ox - tx)).astype(np.float64), minlength=n + 1)[1:] / per + tx
    bbox = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] if s else [0, 0, 0, 0]
                     for s in ndi.find_objects(labels, max_label=n)], np.int64).reshape(n, 4)
    # larger than the model's largest object: not an object of this kind (e.g. a dark
    # band of epidermis), and beyond the size the halo guarantees to see whole
    max_px = float(spec.postprocess.get("max_size_um", spec.max_object_um)) / mpp
    fits = np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]) <= max_px
    owned = present & (plan.owners(cy, cx) == tile.index) & fits
    score = np.bincount(lab, fg.ravel()[at].astype(np.float64), minlength=n + 1)[1:] / per
    if probs is not None:
        prob = np.stack([np.bincount(lab, p.ravel()[at], minlength=n + 1)[1:] for p in probs], 1)
        prob = prob / per[:, None]
    else:
        prob = np.ones((n, 1))
    rule_class = None
    if rule is not None:
        h, w = plan.shape  # the extent's edges, in this tile's labels' coordinates
        whole = ((bbox[:, 0] + box[0] > 0) & (bbox[:, 1] + box[1] > 0)
                 & (bbox[:, 2] + box[0] < h) & (bbox[:, 3] + box[1] < w))
        rule_class = stain_classes(rule, image[inside], labels, fg, prob, area * mpp**2, bbox,
                                   whole & owned, mpp)
        # below the spec's own smallest size: dropped, as without the rule, unless re-typed
        owned &= (area * mpp**2 >= min_area_um2) | (rule_class >= 0)
    if owned.sum() >= stride:
        raise ValueError(f"tile {tile.index} holds {owned.sum()} objects, more than {stride - 1}")
    keep = np.flatnonzero(owned)
    gid = np.zeros(n + 1, np.uint32)
    gid[keep + 1] = tile.index * stride + np.arange(1, keep.size + 1, dtype=np.uint32)
    columns = {
        "id": gid[keep + 1].astype(np.int64),
        "y": cy[keep],
        "x": cx[keep],
        "bbox_y0": bbox[keep, 0] + oy,
        "bbox_x0": bbox[keep, 1] + ox,
        "bbox_y1": bbox[keep, 2] + oy,
        "bbox_x1": bbox[keep, 3] + ox,
        "area_px": area[keep],
        "score": score[keep],
        "prob": prob[keep],
    }
    if rule_class is not None:  # the class a stain rule chose (-1: the network's argmax)
        columns["rule_class"] = rule_class[keep]
    if grid is not None:  # level-0 pixels per work pixel: row count × column count
        weight = (np.asarray(grid.level0_counts(box[0], box[2], 0), np.float64)[row]
                  * np.asarray(grid.level0_counts(box[1], box[3], 1), np.float64)[col])
        columns["area_level0"] = np.bincount(lab, weight, minlength=n + 1)[1:][keep]
    ids = np.zeros(labels.shape, np.uint32)
    ids.ravel()[at] = gid[lab]
    return TileOutput(tile.index, box, ids, columns)


def _points(outputs, tile, plan, spec, mpp, stride) -> TileOutput:
    heat = outputs["heatmap"][0]
    coords, scores = postprocess_points(spec.postprocess, mpp, heat)
    oy, ox = tile.outer[:2]
    gy, gx = coords[:, 0] + oy, coords[:, 1] + ox
    owned = plan.owners(gy, gx) == tile.index
    keep = np.flatnonzero(owned)
    probs = _class_probs(outputs, spec)
    iy = np.clip(np.rint(coords[keep, 0]).astype(int), 0, heat.shape[0] - 1)
    ix = np.clip(np.rint(coords[keep, 1]).astype(int), 0, heat.shape[1] - 1)
    if probs is not None:
        prob = probs[:, iy, ix].T.astype(np.float64).reshape(keep.size, probs.shape[0])
    else:
        prob = np.ones((keep.size, 1))
    radius = float(spec.postprocess.get("radius_um", 4.0)) / mpp
    ids = tile.index * stride + np.arange(1, keep.size + 1, dtype=np.int64)
    columns = {
        "id": ids,
        "y": gy[keep],
        "x": gx[keep],
        "bbox_y0": np.floor(gy[keep] - radius).astype(np.int64),
        "bbox_x0": np.floor(gx[keep] - radius).astype(np.int64),
        "bbox_y1": np.ceil(gy[keep] + radius).astype(np.int64) + 1,
        "bbox_x1": np.ceil(gx[keep] + radius).astype(np.int64) + 1,
        "area_px": np.full(keep.size, np.pi * radius**2),
        "score": scores[keep].astype(np.float64),
        "prob": prob,
    }
    return TileOutput(tile.index, intersect(tile.outer, (0, 0, *plan.shape)), None, columns)


def _empty(tile: Tile, box: Box, spec: ModelSpec) -> TileOutput:
    h, w = box[2] - box[0], box[3] - box[1]
    n_prob = len(spec.class_names) if "class_probs" in spec.outputs else 1
    columns = {c: np.zeros(0, np.int64 if c == "id" or c.startswith("bbox") else np.float64)
               for c in BASE_COLUMNS}
    columns["prob"] = np.zeros((0, n_prob))
    return TileOutput(tile.index, box, np.zeros((h, w), np.uint32), columns)
