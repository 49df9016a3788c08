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
from napari_hemato.core.tiling import Box, Tile, TilePlan, intersect

if TYPE_CHECKING:
    from napari_hemato.core.spec import ModelSpec

#: raw table columns every tile writes (work-grid pixel coordinates, ROI-relative)
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
    *, stride: int,
) -> TileOutput:
    """Post-process one tile's outputs (role -> (C, H, W)) into owned objects."""
    if spec.kind == "instances":
        return _instances(outputs, tile, plan, spec, mpp, stride)
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


def _instances(outputs, tile, plan, spec, mpp, stride) -> TileOutput:
    fg = outputs["foreground"][0]
    dist = outputs["distance"][0] if "distance" in outputs else None
    probs = _class_probs(outputs, spec)
    labels = postprocess_instances(spec.postprocess, mpp, fg, dist, probs, spec.class_names)
    oy, ox = tile.outer[:2]
    n = int(labels.max())
    box = intersect(tile.outer, (0, 0, *plan.shape))
    if n == 0:
        return _empty(tile, box, spec)
    idx = np.arange(1, n + 1)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    cy = np.bincount(flat, yy.ravel(), minlength=n + 1)[1:] / area + oy
    cx = np.bincount(flat, xx.ravel(), minlength=n + 1)[1:] / area + ox
    slices = ndi.find_objects(labels)
    bbox = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices], np.int64)
    # larger than the model's largest object: not an object of this kind (e.g. a dark
    # band of epidermis), and beyond the size the halo guarantees to see whole
    max_px = float(spec.postprocess.get("max_size_um", spec.max_object_um)) / mpp
    fits = np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]) <= max_px
    owned = (plan.owners(cy, cx) == tile.index) & fits
    if owned.sum() >= stride:
        raise ValueError(f"tile {tile.index} holds {owned.sum()} objects, more than {stride - 1}")
    score = ndi.mean(fg, labels, idx).astype(np.float64)
    if probs is not None:
        prob = np.stack([np.bincount(flat, p.ravel(), minlength=n + 1)[1:] for p in probs], 1)
        prob = prob / area[:, None]
    else:
        prob = np.ones((n, 1))
    keep = np.flatnonzero(owned)
    gid = np.zeros(n + 1, np.uint32)
    gid[keep + 1] = tile.index * stride + np.arange(1, keep.size + 1, dtype=np.uint32)
    fragment = gid[labels]
    ly0, lx0 = box[0] - oy, box[1] - ox
    fragment = fragment[ly0 : ly0 + box[2] - box[0], lx0 : lx0 + box[3] - box[1]]
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
    return TileOutput(tile.index, box, np.ascontiguousarray(fragment), columns)


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
