"""COCO JSON with RLE masks (no pycocotools needed), and the image they are drawn on as a PNG.

For instances with a label image, the image region under the labels is written
as ``<name>.png`` beside the JSON, and ``images[0]`` describes that PNG
(``file_name``, ``height``, ``width``): masks and boxes are in its pixels, so
any COCO loader (pycocotools, torchvision, detectron2, ...) pairs them. The
slide and the region's level-0 offset are kept in ``images[0]["napari_hemato"]``
(``slide``, ``origin`` (y, x), ``slide_shape``). When the image cannot be read,
or for points, ``images[0]`` is the whole slide (``file_name`` its name) and
coordinates are level-0 pixels.

Masks are COCO run-length encodings over the whole COCO image, in
column-major (Fortran) order: ``counts`` alternate background / foreground
run lengths, starting with background. They are written as compressed
strings with pycocotools' LEB128-like code (6 bits per character, ASCII
48..111, counts after the third stored as differences to the count two
before). Both string and list ``counts`` are read, and polygon segmentations
from other tools are rasterised.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    class_names_from,
    from_header,
    header,
    iter_objects,
    json_value,
    prob_columns,
    restore_table,
)
from napari_hemato.core.export._region import region_rgb
from napari_hemato.core.export.geojson import rasterize

__all__ = ["decode_rle", "encode_rle", "export_coco", "import_coco", "rle_from_string",
           "rle_to_string"]

log = logging.getLogger(__name__)

_NAMED = ("id", "class", "score", "confidence", "provenance", "reviewed")


def encode_rle(mask: np.ndarray, size: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> list[int]:
    """COCO run lengths of ``mask`` placed at ``offset`` (y, x) in an image of ``size`` (H, W).

    Examples
    --------
    >>> encode_rle(np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], bool), (3, 3))
    [3, 2, 2, 1, 1]
    """
    mask = np.asarray(mask, bool)
    big_h, big_w = (int(v) for v in size)
    h = mask.shape[0]
    idx = np.flatnonzero(mask.ravel(order="F"))
    if idx.size == 0:
        return [big_h * big_w]
    g = (offset[1] + idx // h) * big_h + (offset[0] + idx % h)
    brk = np.flatnonzero(np.diff(g) != 1) + 1
    begin, end = g[np.r_[0, brk]], g[np.r_[brk - 1, g.size - 1]] + 1
    counts = np.empty(2 * begin.size + 1, np.int64)
    counts[0] = begin[0]
    counts[1::2] = end - begin
    counts[2:-1:2] = begin[1:] - end[:-1]
    counts[-1] = big_h * big_w - end[-1]
    return counts[:-1].tolist() if counts[-1] == 0 else counts.tolist()


def decode_rle(counts, size: tuple[int, int], box=None) -> np.ndarray:
    """The part ``box`` (y0, x0, y1, x1; default all) of the mask run lengths ``counts`` encode.

    Examples
    --------
    >>> decode_rle([3, 2, 2, 1, 1], (3, 3)).astype(int).tolist()
    [[0, 1, 0], [0, 1, 1], [0, 0, 0]]
    """
    y0, x0, y1, x1 = box if box is not None else (0, 0, *size)
    out = np.zeros((y1 - y0, x1 - x0), bool)
    rows, cols = _pixels(counts, size, (y0, x0, y1, x1))
    out[rows - y0, cols - x0] = True
    return out


def _pixels(counts, size, box) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the foreground pixels inside ``box``."""
    big_h, big_w = (int(v) for v in size)
    c = np.asarray(rle_from_string(counts) if isinstance(counts, str) else counts, np.int64)
    if c.sum() != big_h * big_w or (c < 0).any():
        raise ExportError(f"RLE counts sum to {c.sum()}, not {big_h} x {big_w}")
    begin, length = (np.cumsum(c) - c)[1::2], c[1::2]
    n = int(length.sum())
    g = np.repeat(begin - (np.cumsum(length) - length), length) + np.arange(n)
    rows, cols = g % big_h, g // big_h
    y0, x0, y1, x1 = box
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return rows[inside], cols[inside]


def rle_to_string(counts) -> str:
    """pycocotools' compressed string for run lengths (``rleToString``).

    Examples
    --------
    >>> rle_to_string([0, 3, 5, 40, 2])
    '035U1M'
    """
    out = []
    counts = [int(v) for v in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_from_string(text: str) -> list[int]:
    """Run lengths from pycocotools' compressed string (``rleFrString``).

    Examples
    --------
    >>> rle_from_string("035U1M")
    [0, 3, 5, 40, 2]
    """
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _categories(ann: AnnotationSet, unlisted: bool) -> list[str]:
    names = [str(c) for c in ann.class_names]
    present = {str(c) for c in ann.table["class"].dropna()} if "class" in ann.table else set()
    missing = unlisted or (ann.table["class"].isna().any() if "class" in ann.table
                           else len(ann.table) > 0)
    extra = sorted(present - set(names) - {"unassigned"})
    if ("unassigned" in present or missing) and "unassigned" not in names:
        extra.insert(0, "unassigned")
    return names + extra


def export_coco(annotations: AnnotationSet, path: str | os.PathLike, *, image=None,
                overwrite: bool = False, base_dir: str | os.PathLike | None = None) -> Path:
    """Write objects as COCO JSON (one image, RLE masks) and the image region as a PNG beside it.

    Parameters
    ----------
    annotations : AnnotationSet
        Instances (RLE masks) or points (COCO keypoints, no mask).
    path : path
        The ``.json`` file to write; the PNG is ``path.with_suffix(".png")``.
    image : array, optional
        The pixels under the labels; default: read from ``annotations.image_path``.
    overwrite : bool
        Replace an existing file.
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> export_coco(cells, "cells_coco.json")  # doctest: +SKIP
    >>> import_coco("cells_coco.json").table["class"].value_counts()  # doctest: +SKIP
    """
    dest = check_destination(path, overwrite=overwrite, base_dir=base_dir)
    ann, table = annotations, annotations.table
    box = ann.box
    instances = ann.kind == "instances" and ann.labels is not None
    rgb = region_rgb(ann, image, what=str(dest)) if instances else None
    outputs = [dest]
    if rgb is not None:  # the COCO image is the region: coordinates relative to its origin
        png = check_destination(dest.with_suffix(".png"), overwrite=overwrite, base_dir=base_dir)
        if png == dest:
            raise ExportError(f"cannot write {dest}: the JSON needs a suffix other than .png")
        outputs.append(png)
        fy, fx = box[:2]
        shape = ann.labels.shape
    else:  # the COCO image is the whole slide (level-0 coordinates)
        fy = fx = 0
        shape = ann.image_shape or ((box[2], box[3]) if box else None)
        if shape is None:
            raise ExportError(f"cannot write {dest}: image_shape is unknown and there are no labels")
    big_h, big_w = (int(v) for v in shape)
    if rgb is None and box and (min(box[:2]) < 0 or box[2] > big_h or box[3] > big_w):
        raise ExportError(f"cannot write {dest}: labels {box} reach outside the image {shape}")
    masks = {}
    if instances:
        for value, (rows, cols), mask in iter_objects(ann.labels):
            masks[value] = (mask, box[0] - fy + rows.start, box[1] - fx + cols.start)
    unlisted = sorted(set(masks) - set(table.get("id", [])))
    cat_id = {name: k for k, name in enumerate(_categories(ann, bool(unlisted)), start=1)}
    probs = prob_columns(table)
    rest = [c for c in table.columns if c not in _NAMED and c not in probs]
    out = []
    for row in [*table.to_dict("records"), *({"id": v, "in_table": False} for v in unlisted)]:
        oid = int(row["id"])
        cls = json_value(row.get("class"))
        item = {"id": len(out) + 1, "image_id": 1, "category_id": cat_id["unassigned" if cls is None else cls],
                "iscrowd": 0, "napari_hemato_id": oid}
        if oid in masks:
            mask, y0, x0 = masks.pop(oid)
            ys, xs = np.nonzero(mask)
            item["segmentation"] = {"size": [big_h, big_w],
                                    "counts": rle_to_string(encode_rle(mask, shape, (y0, x0)))}
            item["bbox"] = [int(x0 + xs.min()), int(y0 + ys.min()),
                            int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            item["area"] = int(mask.sum())
        else:
            x, y = json_value(row.get("x")), json_value(row.get("y"))
            x, y = (None if x is None else x - fx), (None if y is None else y - fy)
            item["segmentation"], item["area"] = [], 0
            item["bbox"] = [x or 0.0, y or 0.0, 0.0, 0.0]
            if ann.kind == "points" and x is not None and y is not None:
                item["keypoints"], item["num_keypoints"] = [x, y, 2], 1
        if row.get("in_table") is False:
            item["napari_hemato"] = {"in_table": False}
            out.append(item)
            continue
        for key in ("score", "confidence", "provenance", "reviewed"):
            if key in row:
                item[key] = json_value(row[key])
        item["probs"] = {c[len("prob_"):]: json_value(row[c]) for c in probs}
        item["napari_hemato"] = {c: json_value(row[c]) for c in rest}
        if cls is None and "class" in row:
            item["napari_hemato"]["class"] = None
        out.append(item)
    if ann.kind == "instances" and (n_empty := sum(1 for a in out if not a["segmentation"])):
        log.warning("%d object(s) in the table have no mask in the labels", n_empty)
    entry = {"id": 1, "file_name": Path(ann.image_path or "image").name,
             "height": big_h, "width": big_w}
    if rgb is not None:
        entry["file_name"] = outputs[1].name
        entry["napari_hemato"] = {
            "slide": None if ann.image_path is None else str(ann.image_path),
            "origin": [int(fy), int(fx)],
            "slide_shape": None if ann.image_shape is None else [int(v) for v in ann.image_shape]}
    doc = {
        "info": {"description": "napari-hemato annotations", "version": "1.0"},
        "licenses": [],
        "images": [entry],
        "categories": [{"id": k, "name": n, "supercategory": "object"} for n, k in cat_id.items()],
        "annotations": out,
        "napari_hemato": header(ann),
    }
    with atomic_outputs(outputs, overwrite=overwrite) as tmps:
        tmps[0].write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
        if rgb is not None:
            from PIL import Image

            Image.fromarray(rgb).save(tmps[1], format="PNG")
    return dest


def import_coco(path: str | os.PathLike) -> AnnotationSet:
    """Read a COCO JSON written by :func:`export_coco` (or another tool) back.

    The label image covers the exported region (or the whole first image for
    foreign files); the table is restored exactly for files this package wrote.

    Returns
    -------
    AnnotationSet

    Examples
    --------
    >>> ann = import_coco("cells_coco.json")  # doctest: +SKIP
    >>> ann.origin, ann.labels.shape  # doctest: +SKIP
    ((40, 60), (120, 160))
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(path, "COCO JSON", _read_coco)


def _read_coco(path) -> AnnotationSet:
    """:func:`import_coco`, checking every value a hostile file could abuse."""
    from napari_hemato.core.export import _atomic as g

    try:
        doc = json.loads(g.check_file_size(path).read_text(encoding="utf-8"))
        image = doc["images"][0]
        big_h, big_w = g.check_label_shape((image["height"], image["width"]), path)
        cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
        items = [a for a in doc.get("annotations", []) if a.get("image_id", image["id"]) == image["id"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ExportError(f"cannot read COCO JSON {path}: {exc}") from exc
    g.check_count(len(items), path, "annotations")
    head = dict(doc.get("napari_hemato") or {})
    try:  # our COCO image may be a region of the slide, at this level-0 offset
        fy, fx = g.check_origin((image.get("napari_hemato") or {}).get("origin") or (0, 0), path)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"cannot read COCO JSON {path}: bad image origin ({exc})") from exc
    if head.get("shape"):
        (y0, x0), (h, w) = g.check_origin(head["origin"], path), g.check_label_shape(head["shape"], path)
    else:
        y0, x0, h, w = 0, 0, big_h, big_w
    labels = np.zeros((h, w), np.uint32) if head.get("shape") or not head else None
    box = (y0 - fy, x0 - fx, y0 - fy + h, x0 - fx + w)  # the labels, in COCO image pixels
    rows, total = [], 0
    for item in items:
        oid = g.check_id(item.get("napari_hemato_id", item["id"]), path)
        seg = item.get("segmentation")
        if labels is not None and seg:
            if isinstance(seg, dict):
                if g.check_label_shape(seg["size"], path) != (big_h, big_w):
                    raise ExportError(f"{path}: annotation {oid}'s mask is {seg['size']}, "
                                      f"not the image's {big_h} x {big_w}")
                if len(seg["counts"]) > g.MAX_RLE_RUNS:
                    raise ExportError(f"{path}: annotation {oid}'s mask has {len(seg['counts'])} "
                                      f"run-length values, more than {g.MAX_RLE_RUNS}")
                total += len(seg["counts"])
                if total > g.MAX_TOTAL_VERTICES:
                    raise ExportError(f"{path}: more than {g.MAX_TOTAL_VERTICES} vertices and runs in all")
                try:
                    py, px = _pixels(seg["counts"], seg["size"], box)
                except ExportError as exc:
                    raise ExportError(f"{path}: annotation {oid}: {exc}") from None
                labels[py - box[0], px - box[1]] = oid
            else:
                total = g.check_vertices(sum(len(p) // 2 for p in seg), path, oid, total)
                rings = g.check_rings([g.check_coords(p, path, oid) for p in seg], path, oid)
                labels[rasterize(rings, box)] = oid
        extra = dict(item.get("napari_hemato") or {})
        if extra.pop("in_table", True) is False:
            continue
        row = {"id": oid, "class": cats.get(item.get("category_id"))}
        row.update({k: item[k] for k in ("score", "confidence", "provenance", "reviewed") if k in item})
        row.update({f"prob_{k}": v for k, v in (item.get("probs") or {}).items()})
        if not head and "bbox" in item:
            bx, by, bw, bh = g.check_coords(item["bbox"], path, oid).ravel()
            row.update(y=by + bh / 2 - 0.5, x=bx + bw / 2 - 0.5, area_px=item.get("area"))
        rows.append({**row, **extra})
    g.check_ids([r["id"] for r in rows], path)
    columns = head.get("columns") or list(dict.fromkeys(c for r in rows for c in r))
    table = restore_table(rows, columns, head.get("dtypes"))
    if not head:
        head = {"kind": "instances", "image_shape": [big_h, big_w],
                "image_path": image.get("file_name"), "class_names": list(cats.values())}
    head.setdefault("class_names", class_names_from(table))
    return from_header(head, table, labels)
