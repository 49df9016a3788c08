"""Annotation sets <-> napari layer data (no Qt; napari imported lazily).

A layer made here carries everything needed to rebuild its annotation set:
the label image or point coordinates as data, the object table as
``features`` (with an ``index`` column = label value, as napari expects), and
``metadata["napari_hemato"]`` (role, classes, origin, µm/px, image, run id).
Layers are placed in the same world units as the image layer the reader made:
µm when the pixel size is known, level-0 pixels otherwise.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.class_colors import class_color_float

KEY = "napari_hemato"
POINT_DIAMETER_UM = 12.0


def _placement(ann: AnnotationSet) -> tuple[tuple[float, float], tuple[float, float]]:
    unit = ann.mpp if ann.mpp else 1.0
    return (unit, unit), (ann.origin[0] * unit, ann.origin[1] * unit)


def labels_colormap(table: pd.DataFrame, class_names=None) -> dict | None:
    """``{label value: RGBA}`` colouring each object by its class.

    None (napari's per-object colours) when there is only one class, so that
    touching objects stay distinguishable.
    """
    classes = set(table["class"].astype(str))
    if len(set(class_names or ()) | classes) <= 1:
        return None
    colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for obj_id, name in zip(table["id"].to_numpy(), table["class"].astype(str), strict=True):
        colors[int(obj_id)] = class_color_float(name)
    return colors


def class_colors(classes: pd.Series) -> np.ndarray:
    """``(n, 4)`` RGBA per object from its class (one colour lookup per class, not per row)."""
    codes, names = pd.factorize(classes.astype(str))
    palette = np.array([class_color_float(c) for c in names] or np.zeros((0, 4)), float).reshape(-1, 4)
    return palette[codes] if len(codes) else np.zeros((0, 4))


def layer_metadata(ann: AnnotationSet, *, role: str, run_id: str | None = None) -> dict:
    return {KEY: {
        "role": role,
        "kind": ann.kind,
        "class_names": list(ann.class_names),
        "origin": [int(v) for v in ann.origin],
        "mpp": ann.mpp,
        "image_path": ann.image_path,
        "image_shape": list(ann.image_shape) if ann.image_shape else None,
        "run_id": run_id or uuid.uuid4().hex[:8],
        **{k: v for k, v in ann.metadata.items() if isinstance(v, (str, int, float, dict, list))},
    }}


def features_of(table: pd.DataFrame) -> pd.DataFrame:
    """The layer ``features``: the table plus napari's ``index`` (= label value) column."""
    features = table.reset_index(drop=True).copy()
    features.insert(0, "index", features["id"].to_numpy(np.int64))
    return features


def annotation_layer_data(ann: AnnotationSet, *, name: str, run_id: str | None = None) -> tuple:
    """A napari LayerDataTuple (Labels for instances, Points for points)."""
    scale, translate = _placement(ann)
    meta = layer_metadata(ann, role=ann.kind, run_id=run_id)
    units = {"units": ("um", "um")} if ann.mpp else {}
    if ann.kind == "instances":
        kwargs = {
            "name": name, "scale": scale, "translate": translate, "opacity": 0.55,
            "features": features_of(ann.table), "metadata": meta,
            **units,
        }
        colormap = labels_colormap(ann.table, ann.class_names)
        if colormap is not None:
            kwargs["colormap"] = colormap
        return (ann.labels, kwargs, "labels")
    unit = ann.mpp if ann.mpp else 1.0
    data = ann.table[["y", "x"]].to_numpy(float) - np.asarray(ann.origin, float)
    colors = class_colors(ann.table["class"])
    kwargs = {
        "name": name, "scale": scale, "translate": translate, "metadata": meta,
        "features": features_of(ann.table),
        "size": POINT_DIAMETER_UM / unit if ann.mpp else 24.0,
        "symbol": "ring", "border_width": 0.15, "border_width_is_relative": True,
        "face_color": colors if len(colors) else "magenta",
        "border_color": colors if len(colors) else "magenta",
        **units,
    }
    return (data, kwargs, "points")


def annotations_from_layer(layer) -> AnnotationSet:
    """Rebuild the annotation set of a layer made by :func:`annotation_layer_data`.

    The label image is the layer's own array (not a copy), so a review
    session edits what the viewer shows.
    """
    return annotations_from_data(layer.data, layer.metadata, layer.features, name=layer.name)


def annotations_from_data(data, metadata: dict, features, *, name: str = "layer") -> AnnotationSet:
    """:func:`annotations_from_layer` from a layer's data, metadata and features."""
    meta = (metadata or {}).get(KEY)
    if not meta or meta.get("kind") not in ("instances", "points"):
        raise ValueError(f"layer {name!r} was not made by napari-hemato (no object table)")
    table = pd.DataFrame(features).drop(columns=["index"], errors="ignore").copy()
    origin = tuple(meta.get("origin", (0, 0)))
    labels = None
    if meta["kind"] == "points":
        if len(data):
            yx = np.asarray(data, float)[:, -2:] + np.asarray(origin, float)
            table["y"], table["x"] = yx[:, 0], yx[:, 1]
    elif not meta.get("lazy"):
        labels = data  # a lazy whole-slide layer's labels stay in its run's store, unread
    extra = {k: v for k, v in meta.items()
             if k not in {"role", "kind", "class_names", "origin", "mpp", "image_path", "image_shape"}}
    return AnnotationSet(
        kind=meta["kind"], table=table, class_names=list(meta["class_names"]), labels=labels,
        origin=origin, mpp=meta.get("mpp"), image_path=meta.get("image_path"),
        image_shape=tuple(meta["image_shape"]) if meta.get("image_shape") else None,
        metadata=extra,
    )
