"""OME-Zarr (NGFF 0.5, zarr v3) labels with a class table.

Layout of ``cells.zarr``::

    zarr.json                     attributes["napari_hemato"]: origin, classes, dtypes ...
    labels/zarr.json              attributes["ome"] = {"version": "0.5", "labels": [name]}
    labels/<name>/zarr.json       "ome": multiscales (axes y, x; scale + translation)
                                  and "image-label" (colors, properties per label value)
    labels/<name>/0/              the uint32 label array (dimension names y, x)
    labels/<name>/objects.csv     the full object table (exact round-trip)

Coordinates are in micrometres when the pixel size is known (scale = mpp,
translation = origin x mpp), else in level-0 pixels. A points set becomes a
group holding only ``objects.csv``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export.points_csv import (
    class_color,
    class_names_from,
    from_header,
    header,
    json_value,
    prob_columns,
    read_table_csv,
    write_table_csv,
)

__all__ = ["export_omezarr", "import_omezarr"]

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
_CHUNK = 1024
_PROPERTIES = ("class", "confidence", "score", "area_px", "provenance", "reviewed")


def _multiscales(name: str, ann: AnnotationSet) -> list[dict]:
    s = float(ann.mpp) if ann.mpp else 1.0
    unit = {"unit": "micrometer"} if ann.mpp else {}
    axes = [{"name": ax, "type": "space", **unit} for ax in "yx"]
    transforms = [{"type": "scale", "scale": [s, s]},
                  {"type": "translation", "translation": [ann.origin[0] * s, ann.origin[1] * s]}]
    return [{"name": name, "axes": axes,
             "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]


def _image_label(ann: AnnotationSet, values: np.ndarray) -> dict:
    table = ann.table
    cols = [c for c in (*_PROPERTIES, *prob_columns(table)) if c in table.columns]
    rows = {int(r["id"]): r for r in table.to_dict("records")} if "id" in table else {}
    colors, props = [], []
    for v in values.tolist():
        row = rows.get(v)
        cls = None if row is None else json_value(row.get("class"))
        colors.append({"label-value": v, "rgba": [*class_color(cls, ann.class_names), 255]})
        if row is not None:
            props.append({"label-value": v, **{c: json_value(row[c]) for c in cols}})
    return {"colors": colors, "properties": props}


def export_omezarr(annotations: AnnotationSet, path: str | os.PathLike, *, name: str = "cells",
                   overwrite: bool = False, base_dir: str | os.PathLike | None = None) -> Path:
    """Write labels and table as an OME-Zarr (NGFF 0.5) labels group.

    Parameters
    ----------
    annotations : AnnotationSet
        Instances (label image + table) or points (table only).
    path : path
        The ``.zarr`` folder to create.
    name : str
        Name of the label image under ``labels/``.
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
    with atomic_outputs([dest], overwrite=overwrite, folders=True) as (tmp,):
        root = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        root.attrs["napari_hemato"] = head
        if instances:
            labels = np.ascontiguousarray(ann.labels, np.uint32)
            group = root.create_group("labels")
            group.attrs["ome"] = {"version": NGFF_VERSION, "labels": [name]}
            sub = group.create_group(name)
            values = np.unique(labels)
            sub.attrs["ome"] = {"version": NGFF_VERSION,
                                "multiscales": _multiscales(name, ann),
                                "image-label": _image_label(ann, values[values != 0])}
            chunks = tuple(max(1, min(_CHUNK, s)) for s in labels.shape)
            arr = sub.create_array("0", shape=labels.shape, dtype="uint32", chunks=chunks,
                                   fill_value=0, dimension_names=["y", "x"])
            arr[...] = labels
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
