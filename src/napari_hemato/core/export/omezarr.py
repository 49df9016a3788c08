"""OME-Zarr (NGFF 0.5, zarr v3): the image region as the root image, labels and a class table under it.

Layout of ``cells.ome.zarr``::

    zarr.json                     attributes["ome"]: multiscales of the RGB image region
                                  (axes c, y, x) and omero channels R, G, B;
                                  attributes["napari_hemato"]: origin, classes, dtypes ...
    0/, 1/, ...                   the uint8 (3, H, W) image region and its 2x pyramid
    labels/zarr.json              attributes["ome"] = {"version": "0.5", "labels": [name]}
    labels/<name>/zarr.json       "ome": multiscales (axes y, x; as many levels as the
                                  image) and "image-label" (source "../../", colors and
                                  properties: class, confidence, ... per label value)
    labels/<name>/0/, 1/, ...     the uint32 label array (level 0 exact, then every
                                  other pixel of the level before)
    labels/<name>/objects.csv     the full object table (exact round-trip)

ome-zarr-py and napari-ome-zarr open it as an image with a labels layer.
Coordinates are in micrometres when the pixel size is known (scale = mpp,
translation = origin x mpp), else in level-0 pixels; pyramid levels shift by
half a (coarser) pixel so that every level lands on the same place. The image
region comes from ``image=`` or is read from ``ann.image_path``; when neither
is available the root holds only the labels group (a warning says so). A points
set becomes a group holding only ``objects.csv``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    class_color,
    class_names_from,
    from_header,
    header,
    json_value,
    prob_columns,
    read_table_csv,
    write_table_csv,
)
from napari_hemato.core.export._region import region_rgb

__all__ = ["export_omezarr", "import_omezarr"]

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
_CHUNK = 1024
_PROPERTIES = ("class", "confidence", "score", "area_px", "area_um2", "provenance", "reviewed")
_PYRAMID_UNTIL = 1024  # halve until the largest side is at most this


def _multiscales(name: str, ann: AnnotationSet, n_levels: int, channels: bool) -> list[dict]:
    s = float(ann.mpp) if ann.mpp else 1.0
    unit = {"unit": "micrometer"} if ann.mpp else {}
    axes = [{"name": ax, "type": "space", **unit} for ax in "yx"]
    lead_axes, lead = ([{"name": "c", "type": "channel"}], [1.0]) if channels else ([], [])
    lead_shift = [0.0] if channels else []
    datasets = []
    for k in range(n_levels):
        f = 2**k
        shift = [(ann.origin[i] + (f - 1) / 2) * s for i in range(2)]
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [*lead, s * f, s * f]},
            {"type": "translation", "translation": [*lead_shift, *shift]}]})
    return [{"name": name, "axes": lead_axes + axes, "datasets": datasets}]


def _n_levels(shape, levels: int | None) -> int:
    if levels is not None:
        if levels < 1:
            raise ExportError(f"levels must be at least 1, not {levels}")
        return int(levels)
    n, side = 1, max(shape)
    while side > _PYRAMID_UNTIL:
        side, n = (side + 1) // 2, n + 1
    return n


def _halve_rgb(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> (3, ceil(H/2), ceil(W/2)): mean of 2 x 2 blocks (edge replicated)."""
    _, h, w = rgb.shape
    padded = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge").astype(np.uint16)
    blocks = padded.reshape(3, (h + 1) // 2, 2, (w + 1) // 2, 2).sum(axis=(2, 4))
    return ((blocks + 2) // 4).astype(np.uint8)


def _omero() -> dict:
    window = {"start": 0, "end": 255, "min": 0, "max": 255}
    return {"channels": [{"label": label, "color": color, "window": window, "active": True}
                         for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))],
            "rdefs": {"model": "color"}}


def _write_levels(group, arrays, dims: list[str]) -> None:
    for k, arr in enumerate(arrays):
        chunks = tuple(max(1, min(_CHUNK if d != "c" else s, s)) for d, s in zip(dims, arr.shape,
                                                                            strict=True))
        out = group.create_array(str(k), shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                 fill_value=0, dimension_names=dims)
        out[...] = arr


def _image_label(ann: AnnotationSet, values: np.ndarray) -> dict:
    table = ann.table
    cols = [c for c in (*_PROPERTIES, *prob_columns(table)) if c in table.columns]
    rows = {int(r["id"]): r for r in table.to_dict("records")} if "id" in table else {}
    colors, props = [], []
    for v in values.tolist():
        row = rows.get(v)
        cls = None if row is None else json_value(row.get("class"))
        colors.append({"label-value": v, "rgba": [*class_color(cls, ann.class_names), 255]})
        props.append({"label-value": v} if row is None else
                     {"label-value": v, **{c: json_value(row[c]) for c in cols}})
    return {"source": {"image": "../../"}, "colors": colors, "properties": props}


def export_omezarr(annotations: AnnotationSet, path: str | os.PathLike, *, name: str = "cells",
                   image=None, levels: int | None = None, overwrite: bool = False,
                   base_dir: str | os.PathLike | None = None) -> Path:
    """Write the image region, its labels and the table as an OME-Zarr (NGFF 0.5) image.

    Parameters
    ----------
    annotations : AnnotationSet
        Instances (label image + table) or points (table only).
    path : path
        The ``.zarr`` folder to create.
    name : str
        Name of the label image under ``labels/``.
    image : array, optional
        The pixels under the labels ((H, W) or (H, W, C), any dtype a slide
        may have); default: read from ``annotations.image_path``.
    levels : int, optional
        Pyramid levels (default: halve until the largest side is at most 1024).
    overwrite : bool
        Replace an existing folder (swapped in only once the new one is complete).
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The folder written.

    Examples
    --------
    >>> export_omezarr(cells, "cells.zarr")  # doctest: +SKIP
    >>> import_omezarr("cells.zarr").labels.shape  # doctest: +SKIP
    (120, 160)
    """
    import zarr

    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"invalid label name {name!r}")
    dest = check_destination(path, overwrite=overwrite, base_dir=base_dir)
    ann = annotations
    instances = ann.kind == "instances" and ann.labels is not None
    head = header(ann)
    head["table"] = f"labels/{name}/objects.csv" if instances else "objects.csv"
    head["label_name"] = name if instances else None
    rgb = region_rgb(ann, image, what=str(dest)) if instances else None
    with atomic_outputs([dest], overwrite=overwrite, folders=True) as (tmp,):
        root = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        if instances:
            labels = np.ascontiguousarray(ann.labels, np.uint32)
            n = _n_levels(labels.shape, levels) if rgb is not None else 1
            if rgb is not None:
                pyramid = [np.ascontiguousarray(np.moveaxis(rgb, -1, 0))]
                for _ in range(1, n):
                    pyramid.append(_halve_rgb(pyramid[-1]))
                root.attrs["ome"] = {"version": NGFF_VERSION,
                                     "multiscales": _multiscales("image", ann, n, True),
                                     "omero": _omero()}
                _write_levels(root, pyramid, ["c", "y", "x"])
            group = root.create_group("labels")
            group.attrs["ome"] = {"version": NGFF_VERSION, "labels": [name]}
            sub = group.create_group(name)
            values = np.unique(labels)
            sub.attrs["ome"] = {"version": NGFF_VERSION,
                                "multiscales": _multiscales(name, ann, n, False),
                                "image-label": _image_label(ann, values[values != 0])}
            _write_levels(sub, [labels[::2**k, ::2**k] for k in range(n)], ["y", "x"])
        head["image"] = rgb is not None
        root.attrs["napari_hemato"] = head
        write_table_csv(ann.table, tmp / head["table"])
    return dest


def import_omezarr(path: str | os.PathLike, *, name: str | None = None) -> AnnotationSet:
    """Read labels and table from an OME-Zarr written by :func:`export_omezarr`.

    Other OME-Zarr label groups (NGFF 0.4 / 0.5) are read too: the origin
    comes from the translation, the table from ``image-label`` properties.

    Parameters
    ----------
    path : path
        The ``.zarr`` folder.
    name : str, optional
        Which label image under ``labels/`` (default: the first listed).

    Returns
    -------
    AnnotationSet

    Examples
    --------
    >>> ann = import_omezarr("cells.zarr")  # doctest: +SKIP
    >>> ann.origin, ann.mpp  # doctest: +SKIP
    ((40, 60), 0.5)
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(path, "OME-Zarr", _read_omezarr, name=name)


def _read_omezarr(path, *, name) -> AnnotationSet:
    """:func:`import_omezarr`, checking every value a hostile file could abuse."""
    import zarr

    from napari_hemato.core.export import _atomic as g

    path = Path(path)
    try:
        root = zarr.open_group(store=str(path), mode="r")
        head = dict(root.attrs.get("napari_hemato") or {})
        if head.get("table"):
            g.inside(path, head["table"], path)  # a file of this folder, nothing outside
        if head and not head.get("label_name"):  # a table-only group
            table = read_table_csv(path / head["table"], head.get("dtypes"))
            return from_header(head, table[head["columns"]], None)
        group = root["labels"]
        listed = group.attrs.get("ome", {}).get("labels") or group.attrs.get("labels") or []
        name = name or head.get("label_name") or (listed[0] if listed else None)
        if name is None:
            raise ExportError(f"{path}: no label image listed under labels/")
        g.inside(path / "labels", name, path)
        sub = group[name]
        meta = sub.attrs.get("ome") or sub.attrs.asdict()
        dataset = meta["multiscales"][0]["datasets"][0]
        g.inside(path / "labels" / name, dataset["path"], path)
        array = sub[dataset["path"]]
        if array.ndim != 2:
            raise ExportError(f"{path}: label image {name} is {array.ndim}-D, expected (y, x)")
        g.check_label_shape(array.shape, path)  # before reading: the metadata may lie
        labels = np.asarray(array[...])
    except ExportError:
        raise
    except (OSError, KeyError, IndexError, ValueError, TypeError,
            zarr.errors.BaseZarrError) as exc:
        raise ExportError(f"cannot read OME-Zarr labels {path}: {exc}") from exc
    if labels.ndim != 2:
        raise ExportError(f"{path}: label image {name} is {labels.ndim}-D, expected (y, x)")
    if head.get("table"):
        table = read_table_csv(path / head["table"], head.get("dtypes"))[head["columns"]]
    else:
        head = _foreign_header(meta, dataset)
        props = meta.get("image-label", {}).get("properties", [])
        g.check_count(len(props), path, "label properties")
        table = pd.DataFrame([{"id": g.check_id(p["label-value"], path),
                               **{k: v for k, v in p.items() if k != "label-value"}}
                              for p in props])
        head["class_names"] = class_names_from(table)
    if "id" in table:
        g.check_ids(table["id"], path)
    return from_header(head, table, labels.astype(np.uint32, copy=False))


def _foreign_header(meta: dict, dataset: dict) -> dict:
    scale, translation = [1.0, 1.0], [0.0, 0.0]
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = t["scale"][-2:]
        elif t.get("type") == "translation":
            translation = t["translation"][-2:]
    units = [a.get("unit") for a in meta["multiscales"][0].get("axes", [])[-2:]]
    mpp = float(scale[0]) if units and units[0] == "micrometer" else None
    origin = [round(translation[i] / scale[i]) for i in range(2)]
    return {"kind": "instances", "origin": origin, "mpp": mpp}
