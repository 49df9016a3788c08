"""QuPath-compatible GeoJSON: one Feature per object, exact pixel outlines.

Coordinates are level-0 pixels in QuPath's convention: ``[x, y]`` order, pixel
``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``. Masks are traced
along pixel edges (holes as interior rings, 4-connected parts as a
MultiPolygon), and :func:`rasterize` (even-odd rule sampled at pixel centres)
turns those rings back into exactly the same pixels. Points are written at
the pixel centre (``x + 0.5``).

Properties follow QuPath's GeoJSON (what QuPath 0.4+ reads and shows):

- ``objectType``: ``"detection"`` (default), ``"annotation"`` or ``"cell"``;
- ``classification``: ``{"name": class, "color": [r, g, b]}``;
- ``measurements``: the numeric columns (``confidence``, ``score``, ``area_px``,
  ``area_um2``, ``prob_<CLASS>``), shown in QuPath's measurement table;
- ``metadata``: the object ``id`` and the non-numeric columns as text (``model``,
  ``model_version``, ``provenance``, ``reviewed``, ...), QuPath's string map per object;
- the Feature's ``id`` is a UUID derived from the image and the object id
  (stable across exports), which QuPath takes as the object's ID.

``properties.napari_hemato`` keeps the typed table values (ignored by QuPath)
so that :func:`import_geojson` restores the table exactly.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    class_color,
    class_names_from,
    from_header,
    header,
    iter_objects,
    json_value,
    restore_table,
)

__all__ = ["export_geojson", "import_geojson", "rasterize", "trace_polygons"]

log = logging.getLogger(__name__)

MEASUREMENTS = ("confidence", "score", "area_px", "area_um2")
OBJECT_TYPES = ("detection", "annotation", "cell")
_STEP = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (dy, dx) of +x, +y, -x, -y edges


def trace_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Pixel-edge outlines of a mask: one ``[exterior, *holes]`` per 4-connected part.

    Rings are closed ``(k, 2)`` integer arrays of ``(x, y)`` vertices in pixel
    corner coordinates of ``mask``; exteriors run counter-clockwise in (x, y)
    numbers (positive shoelace area), holes the other way. Rings are simple;
    a hole may touch its exterior (or another hole) at a single vertex.

    Examples
    --------
    >>> trace_polygons(np.ones((1, 2), bool))[0][0].tolist()
    [[0, 0], [2, 0], [2, 1], [0, 1], [0, 0]]
    """
    p = np.pad(np.asarray(mask, bool), 1)
    parts, _ = ndimage.label(p, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    starts, dirs = [], []
    for d, (edges, (sy, sx)) in enumerate((
        (p[1:, :] & ~p[:-1, :], (1, 0)),  # top edge of pixel (y + 1, x), from its top-left
        (p[:, :-1] & ~p[:, 1:], (0, 1)),  # right edge of (y, x), from its top-right
        (p[:-1, :] & ~p[1:, :], (1, 1)),  # bottom edge of (y, x), from its bottom-right
        (p[:, 1:] & ~p[:, :-1], (1, 1)),  # left edge of (y, x + 1), from its bottom-left
    )):
        yy, xx = np.nonzero(edges)
        starts.append(np.column_stack([yy + sy, xx + sx]))
        dirs.append(np.full(yy.size, d))
    start = np.concatenate(starts).tolist()
    direction = np.concatenate(dirs).tolist()
    out: dict[tuple[int, int], list[int]] = {}
    for e, (y, x) in enumerate(start):
        out.setdefault((y, x), []).append(e)
    used = np.zeros(len(start), bool)
    rings: dict[int, list[np.ndarray]] = {}
    for first in range(len(start)):
        if used[first]:
            continue
        chain, e = [], first
        while not used[e]:
            used[e] = True
            chain.append(e)
            (y, x), d = start[e], direction[e]
            nxt = out[(y + _STEP[d][0], x + _STEP[d][1])]
            # at a saddle (two ways on) turn right: diagonal pixels stay apart
            e = nxt[0] if len(nxt) == 1 else next(k for k in nxt if direction[k] == (d + 1) % 4)
        for loop in _simple_loops(chain, start):
            turns = [direction[k] for k in loop]
            keep = [i for i in range(len(loop)) if turns[i] != turns[i - 1]]
            ring = np.array([start[loop[i]][::-1] for i in [*keep, keep[0]]], np.int64) - 1
            (y, x), d = start[loop[0]], turns[0]
            py, px = (y, x) if d == 0 else (y, x - 1) if d == 1 else (y - 1, x - 1) if d == 2 else (y - 1, x)
            rings.setdefault(int(parts[py, px]), []).append(ring)
    return [sorted(rings[part], key=_area, reverse=True) for part in sorted(rings)]


def _simple_loops(chain: list[int], start: list) -> list[list[int]]:
    """Split a closed edge chain at repeated vertices (a self-touching outline
    becomes an exterior plus a hole touching it at one point, as OGC wants)."""
    loops, stack, pos = [], [], {}
    for e in chain:
        v = tuple(start[e])
        if v in pos:
            i = pos[v]
            loops.append(stack[i:])
            for k in stack[i:]:
                pos.pop(tuple(start[k]), None)
            del stack[i:]
        pos[v] = len(stack)
        stack.append(e)
    return [*loops, stack]


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2


def rasterize(rings, box) -> np.ndarray:
    """Pixels of ``box`` (y0, x0, y1, x1) whose centres lie inside ``rings`` (even-odd rule).

    ``rings`` are sequences of ``(x, y)`` vertices (closed or not) in pixel
    corner coordinates; any polygon works, :func:`trace_polygons` output
    comes back exactly.

    Examples
    --------
    >>> rasterize([[(0, 0), (2, 0), (2, 1), (0, 1)]], (0, 0, 2, 3)).astype(int).tolist()
    [[1, 1, 0], [0, 0, 0]]
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = y1 - y0, x1 - x0
    toggles = np.zeros((h, w + 1), np.int64)
    for ring in rings:
        xy = np.asarray(ring, np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        xy = np.vstack([xy, xy[:1]]) - (x0, y0)
        xa, ya, xb, yb = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
        keep = ya != yb
        xa, ya, xb, yb = xa[keep], ya[keep], xb[keep], yb[keep]
        lo = np.clip(np.ceil(np.minimum(ya, yb) - 0.5), 0, h).astype(np.int64)
        hi = np.clip(np.ceil(np.maximum(ya, yb) - 0.5), 0, h).astype(np.int64)
        n = np.maximum(hi - lo, 0)
        edge = np.repeat(np.arange(n.size), n)
        rows = lo[edge] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        t = (rows + 0.5 - ya[edge]) / (yb[edge] - ya[edge])
        xc = xa[edge] + t * (xb[edge] - xa[edge])
        cols = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1, 0, w)
        np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :w] % 2).astype(bool)


def _geometry(polys, oy: int, ox: int) -> dict:
    coords = [[(ring + (ox, oy)).tolist() for ring in poly] for poly in polys]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def export_geojson(annotations: AnnotationSet, path: str | os.PathLike, *,
                   overwrite: bool = False, object_type: str = "detection",
                   base_dir: str | os.PathLike | None = None) -> Path:
    """Write objects as a QuPath-compatible GeoJSON FeatureCollection.

    Parameters
    ----------
    annotations : AnnotationSet
        Instances (Polygon / MultiPolygon outlines) or points (Point features).
    path : path
        The ``.geojson`` file to write.
    overwrite : bool
        Replace an existing file.
    object_type : {"detection", "annotation", "cell"}
        QuPath object type of every feature (a ``"cell"`` has the object's outline
        as its cell boundary and no separate nucleus).
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> export_geojson(cells, "cells.geojson")  # doctest: +SKIP
    >>> import_geojson("cells.geojson").labels.max()  # doctest: +SKIP
    """
    if object_type not in OBJECT_TYPES:
        raise ExportError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, "
                          f"not {object_type!r}")
    dest = check_destination(path, overwrite=overwrite, base_dir=base_dir)
    ann, table = annotations, annotations.table
    points = ann.kind == "points" or ann.labels is None
    oy, ox = ann.origin
    geoms: dict[int, dict] = {}
    if not points:
        for value, (rows, cols), mask in iter_objects(ann.labels):
            geoms[value] = _geometry(trace_polygons(mask), oy + rows.start, ox + cols.start)
    measured = [c for c in table.columns
                if (c in MEASUREMENTS or str(c).startswith("prob_")) and table[c].dtype.kind in "iuf"]
    others = [c for c in table.columns if c not in measured and c != "class"]
    # QuPath's metadata: the object id and the non-numeric columns (model, provenance, ...);
    # positions and boxes QuPath measures itself
    described = [c for c in others if c == "id" or table[c].dtype.kind not in "iuf"]
    scope = f"napari-hemato:{Path(ann.image_path or '').name}:"
    features = []
    for k, row in enumerate(table.to_dict("records"), start=1):
        props = {"objectType": object_type}
        cls = json_value(row.get("class"))
        if cls is not None:
            props["classification"] = {"name": cls, "color": class_color(cls, ann.class_names)}
        props["measurements"] = {c: v for c in measured if (v := json_value(row[c])) is not None}
        props["metadata"] = _metadata({c: json_value(row[c]) for c in described})
        props["napari_hemato"] = {c: json_value(row[c]) for c in others}
        if points:
            geom = {"type": "Point", "coordinates": [float(row["x"]) + 0.5, float(row["y"]) + 0.5]}
        else:
            geom = geoms.pop(int(row["id"]), None)
        oid = json_value(row.get("id", k))
        features.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{scope}{oid}")),
                         "geometry": geom, "properties": props})
    for value, geom in geoms.items():  # painted objects without a table row
        props = {"objectType": object_type, "metadata": {"id": str(value), "in_table": "false"},
                 "napari_hemato": {"id": value, "in_table": False}}
        features.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{scope}{value}")),
                         "geometry": geom, "properties": props})
    if geoms:
        log.warning("%d label(s) without a table row exported as unclassified", len(geoms))
    doc = {"type": "FeatureCollection", "features": features, "napari_hemato": header(ann)}
    with atomic_outputs([dest], overwrite=overwrite) as (tmp,):
        tmp.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
    return dest


def _metadata(values: dict) -> dict[str, str]:
    """QuPath's per-object metadata: a map of strings (booleans as true / false)."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        out[str(key)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _rings(geom: dict) -> list:
    if geom["type"] == "Polygon":
        return list(geom["coordinates"])
    if geom["type"] == "MultiPolygon":
        return [ring for poly in geom["coordinates"] for ring in poly]
    raise ExportError(f"unsupported geometry type {geom['type']!r}")


def import_geojson(path: str | os.PathLike) -> AnnotationSet:
    """Read a GeoJSON written by :func:`export_geojson` (or QuPath) back.

    Polygons are rasterised into a uint32 label image (feature ``id`` as the
    value) over the exported region; the table is restored from the
    properties (exactly, for files this package wrote).

    Returns
    -------
    AnnotationSet

    Examples
    --------
    >>> ann = import_geojson("cells.geojson")  # doctest: +SKIP
    >>> ann.kind, ann.labels.shape  # doctest: +SKIP
    ('instances', (120, 160))
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(path, "GeoJSON", _read_geojson)


def _read_geojson(path) -> AnnotationSet:
    """:func:`import_geojson`, checking every value a hostile file could abuse."""
    from napari_hemato.core.export import _atomic as g

    try:
        doc = json.loads(g.check_file_size(path).read_text(encoding="utf-8"))
        features = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ExportError(f"cannot read GeoJSON {path}: {exc}") from exc
    if not isinstance(features, list):
        raise ExportError(f"{path}: 'features' is not a list")
    g.check_count(len(features), path, "features")
    head = doc.get("napari_hemato") or {}
    geoms = [f.get("geometry") for f in features]
    points = not head.get("shape") if head else all(
        gm and gm["type"] in ("Point", "MultiPoint") for gm in geoms)
    rows, drawn, total = [], [], 0
    for k, feat in enumerate(features, start=1):
        props, geom = feat.get("properties") or {}, feat.get("geometry")
        extra = dict(props.get("napari_hemato") or {})
        oid = g.check_id(extra.get("id", k), path, label=not points)
        if geom is not None and not points:
            rings = _rings(geom)
            total = g.check_vertices(sum(len(r) for r in rings), path, oid, total)
            drawn.append((oid, g.check_rings([g.check_coords(r, path, oid) for r in rings], path, oid)))
        if extra.pop("in_table", True) is False:
            continue
        row = {"id": oid, **props.get("measurements", {}), **extra}
        row["class"] = (props.get("classification") or {}).get("name")
        if points and geom is not None and ("x" not in row or "y" not in row):
            row["x"], row["y"] = (float(v) - 0.5 for v in
                                  g.check_coords(geom["coordinates"][:2], path, oid)[0])
        rows.append(row)
    g.check_ids([r["id"] for r in rows], path, label=not points)
    columns = head.get("columns") or list(dict.fromkeys(c for r in rows for c in r))
    table = restore_table(rows, columns, head.get("dtypes"))
    labels = None
    if not points:
        if head.get("shape"):
            (y0, x0), (h, w) = g.check_origin(head["origin"], path), g.check_label_shape(head["shape"], path)
        elif not drawn:
            y0 = x0 = h = w = 0
        else:
            xy = np.concatenate([r for _, rr in drawn for r in rr])
            y0, x0 = np.floor(xy.min(0)[::-1]).astype(int)
            h, w = g.check_label_shape(np.ceil(xy.max(0)[::-1]).astype(int) - (y0, x0), path)
            head = {**head, "origin": [int(y0), int(x0)]}
        labels = np.zeros((h, w), np.uint32)
        for oid, rings in drawn:
            xy = np.concatenate(rings)
            by0, bx0 = np.maximum(np.floor(xy.min(0)[::-1]).astype(int), (y0, x0))
            by1, bx1 = np.minimum(np.ceil(xy.max(0)[::-1]).astype(int), (y0 + h, x0 + w))
            if by1 > by0 and bx1 > bx0:
                mask = rasterize(rings, (by0, bx0, by1, bx1))
                labels[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0][mask] = oid
    if not head.get("class_names"):
        head = {**head, "class_names": class_names_from(table)}
    head.setdefault("kind", "points" if points else "instances")
    return from_header(head, table, labels)
