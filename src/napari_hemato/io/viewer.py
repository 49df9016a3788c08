"""Glue between napari viewers/layers and the core (napari objects, no Qt).

Widgets call these; tests call them with real layers and no rendering.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from napari_hemato.core.annotations import AnnotationSet, from_result, region_metadata
from napari_hemato.core.errors import HematoError
from napari_hemato.core.sidecar import load_annotations, saved_sets, sidecar_dir
from napari_hemato.core.slide import Slide, open_slide, slide_from_array
from napari_hemato.core.store_edits import MERGED_KEY, merge_missing
from napari_hemato.io.layers import KEY, annotation_layer_data

log = logging.getLogger(__name__)

#: above this many level-0 pixels a result stays lazy (class review only)
MAX_EDITABLE_PIXELS = 64_000_000


def layer_mpp(layer) -> float | None:
    """The µm/px of an image layer: from our reader's metadata, else its scale if in µm."""
    meta = layer.metadata.get(KEY, {})
    if meta.get("mpp"):
        return float(meta["mpp"])
    if _in_um(getattr(layer, "units", ())):
        sy, sx = (float(s) for s in layer.scale[-2:])
        if abs(sy - sx) < 1e-9 * max(sy, sx) and sy != 1.0:
            return sy
    return None


def _in_um(units) -> bool:
    """Whether a layer's (last two) units are micrometres."""
    units = [str(u) for u in units][-2:]
    return bool(units) and all(u in ("micrometer", "um", "µm") for u in units)


def image_info(layer) -> dict:
    """What is known of an image layer's image (:meth:`Slide.info` keys): from our reader's
    metadata, else from the layer (napari's own reader: path, levels, channels, scale)."""
    meta = layer.metadata.get(KEY, {})
    if meta.get("levels"):
        return meta
    path = getattr(getattr(layer, "source", None), "path", None)
    return {"path": str(path or ""), "mpp": layer_mpp(layer),
            "levels": [None] * (len(layer.data) if layer.multiscale else 1),
            "channels": 3 if getattr(layer, "rgb", False) else 1}


def slide_for_layer(layer, *, mpp: float | None = None) -> Slide:
    """The slide behind an image layer: reopened from its file, or wrapped in memory."""
    meta = layer.metadata.get(KEY, {})
    path = meta.get("path") or (layer.source.path if getattr(layer, "source", None) else None)
    if path and Path(path).exists():
        return open_slide(path, mpp=mpp)
    data = layer.data[0] if layer.multiscale else layer.data
    return slide_from_array(data, mpp=mpp, name=layer.name)


def _to_level0_box(layer, world_corners: np.ndarray) -> tuple[int, int, int, int]:
    data = np.array([layer.world_to_data(p) for p in world_corners])[:, -2:]
    y0, x0 = np.floor(data.min(axis=0)).astype(int)
    y1, x1 = np.ceil(data.max(axis=0)).astype(int)
    return (int(y0), int(x0), int(y1), int(x1))


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def camera_world_box(viewer) -> np.ndarray:
    """World corners ``[[y0, x0], [y1, x1]]`` of what the camera shows (its centre, zoom and
    the canvas size)."""
    camera = viewer_camera(viewer)
    canvas = np.asarray(getattr(getattr(viewer, "canvas", None), "size", None) or (600, 800),
                        float)
    cy, cx = (float(v) for v in camera.center[-2:])
    hy, hx = canvas / 2.0 / float(camera.zoom)
    return np.array([[cy - hy, cx - hx], [cy + hy, cx + hx]])


def view_roi(layer, viewer=None) -> tuple[int, int, int, int] | None:
    """Level-0 box of the image layer visible on screen (None when nothing of it is).

    With ``viewer``, the box is what the camera shows (its centre, zoom and the canvas
    size), clipped to the image: never more than the canvas holds, never off the image.
    Without it, the layer's ``corner_pixels`` from the last draw (which napari pads to
    whole tiles, so it may exceed the view).
    """
    shape = np.asarray(layer.level_shapes[0], int)
    h, w = (shape[:2] if getattr(layer, "rgb", False) else shape[-2:])
    if viewer is not None:
        data = np.array([layer.world_to_data(p)[-2:] for p in camera_world_box(viewer)])
        # pixel i covers [i - 0.5, i + 0.5) in napari data coordinates
        y0, x0 = np.floor(data.min(axis=0) + 0.5).astype(int)
        y1, x1 = np.ceil(data.max(axis=0) + 0.5).astype(int)
    else:
        corners = np.asarray(layer.corner_pixels, float)[:, -2:]
        if layer.multiscale:
            corners = corners * np.asarray(layer.downsample_factors[layer.data_level], float)[-2:]
        y0, x0 = np.floor(corners[0]).astype(int)
        y1, x1 = np.ceil(corners[1]).astype(int)
    y0, y1 = max(int(y0), 0), min(int(y1), int(h))
    x0, x1 = max(int(x0), 0), min(int(x1), int(w))
    if y1 <= y0 or x1 <= x0:
        return None
    return (y0, x0, y1, x1)


def shape_rois(shapes_layer, image_layer) -> list[tuple[int, int, int, int]]:
    """Level-0 bounding boxes of every shape drawn in ``shapes_layer``."""
    rois = []
    for vertices in shapes_layer.data:
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(vertices)])[:, -2:]
        rois.append(_to_level0_box(image_layer, world))
    return rois


def run_store_path(image_path: str | Path | None, task: str) -> Path:
    """Where a run's result store goes: ``<image>.hemato/runs/<task>-<time>.zarr``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if image_path and Path(image_path).exists():
        base = sidecar_dir(image_path, create=True) / "runs"
    else:
        import tempfile

        base = Path(tempfile.gettempdir()) / "napari-hemato-runs"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{task}-{stamp}.zarr"
    k = 1
    while path.exists():
        path = base / f"{task}-{stamp}-{k}.zarr"
        k += 1
    return path


def result_layer_data(result, *, name: str, roi=None) -> list[tuple]:
    """Layer data for a finished run: editable in memory when small, lazy otherwise."""
    grid = result.grid
    y0, x0, y1, x1 = roi or grid.roi
    if result.spec.kind == "points" or (y1 - y0) * (x1 - x0) <= MAX_EDITABLE_PIXELS:
        ann = from_result(result, roi=roi)
        return [annotation_layer_data(ann, name=name, run_id=result.path.stem)]
    from napari_hemato.io.layers import features_of, labels_colormap, layer_metadata

    table = result.table()
    ann = AnnotationSet("instances", table, list(result.spec.class_names), None,
                        origin=(grid.roi[0], grid.roi[1]), mpp=grid.mpp0,
                        image_path=str(result.store.config["slide"]["path"]),
                        metadata={"result": str(result.path), "lazy": True,
                                  **region_metadata(grid.roi, None if grid.mpp_assumed
                                                    else grid.mpp0)})
    scale, translate = grid.napari_placement()
    meta = layer_metadata(ann, role="instances", run_id=result.path.stem)
    meta[KEY]["px0_per_data"] = float(grid.factor)
    kwargs = {"name": name, "scale": scale, "translate": translate, "opacity": 0.55,
              "features": features_of(table), "metadata": meta}
    colormap = labels_colormap(table, result.spec.class_names)
    if colormap is not None:
        kwargs["colormap"] = colormap
    if not grid.mpp_assumed:
        kwargs["units"] = ("um", "um")
    levels = result.label_levels()
    if len(levels) > 1:
        kwargs["multiscale"] = True
    return [(levels if len(levels) > 1 else levels[0], kwargs, "labels")]


def preview_layer_data(info, image_layer, *, name: str) -> tuple | None:
    """``(data, kwargs)`` of a live preview of a running instance run (None for points, and
    for a run over ``MAX_EDITABLE_PIXELS``: its levels are built when it completes).

    Everything comes from the run's :class:`~napari_hemato.core.engine.RunInfo`, which the
    engine hands out with its progress events: the store's own metadata is being written by
    the engine's thread and is never parsed here. The labels array exists (with its final
    shape) from the first event on; its chunks are written atomically, so a refresh reads
    either the old or the new chunk, never a half-written one.
    """
    import zarr

    if info is None or info.kind != "instances":
        return None
    grid = info.grid
    scale, translate = grid.napari_placement()
    kwargs = {"scale": scale, "translate": translate, "name": name, "opacity": 0.4,
              "metadata": {KEY: {"role": "preview", "result": str(info.path)}}}
    if not grid.mpp_assumed:
        kwargs["units"] = ("um", "um")
    # the run's own pixel size: a smear field's may have been measured on its red cells
    kwargs = in_image_world(kwargs, image_layer, None if grid.mpp_assumed else grid.mpp0)
    data = zarr.open_array(str(Path(info.path) / "labels" / "0"), mode="r")
    if int(np.prod(data.shape)) > MAX_EDITABLE_PIXELS:
        return None  # one level of a whole slide: napari would read all of it per refresh
    return data, kwargs


def restore_saved_layers(image_path: str | Path, *, image_mpp: float | None = None) -> list[tuple]:
    """Layer data for every annotation set autosaved next to an image, placed in the world of
    its image layer: µm when the image states its pixel size (``image_mpp``), its pixels
    otherwise (a JPEG whose run measured or assumed a pixel size is still shown in pixels).

    A lazy whole-slide set saved its table only: its labels are reopened from the
    run's store, with the saved (corrected) table as features.
    """
    from napari_hemato.io.layers import features_of, labels_colormap

    layers = []
    for name, folder in saved_sets(image_path).items():
        try:
            ann = load_annotations(folder)
            if ann.kind == "instances" and ann.labels is None:
                from napari_hemato.core.engine import open_result

                result = open_result(ann.metadata["result"])
                data, kwargs, kind = result_layer_data(result, name=name)[0]
                # masks saved from an edit window into the store whose rows this table missed
                table, merged = merge_missing(ann.table, result.store,
                                              ann.metadata.get(MERGED_KEY, []))
                kwargs["features"] = features_of(table)
                kwargs["metadata"][KEY][MERGED_KEY] = merged
                colormap = labels_colormap(table, ann.class_names)  # the corrected classes
                if colormap is not None:
                    kwargs["colormap"] = colormap
            else:
                data, kwargs, kind = annotation_layer_data(ann, name=name)
            if image_mpp is None and "units" in kwargs:
                kwargs = in_image_world(kwargs, _PixelImage, ann.mpp)
            kwargs["metadata"][KEY]["sidecar_name"] = name
            layers.append((data, kwargs, kind))
        except (OSError, ValueError, KeyError, HematoError) as err:
            log.warning("could not restore %s: %s", folder, err)
    return layers


class _PixelImage:
    """An image layer in level-0 pixels (no pixel size): what the reader makes of a JPEG."""

    scale, translate, units, metadata = (1.0, 1.0), (0.0, 0.0), ("pixel", "pixel"), {}


def in_image_world(kwargs: dict, image_layer, mpp0: float | None) -> dict:
    """Layer kwargs placed in µm, re-expressed in the world units of ``image_layer``.

    Result layers are placed in µm whenever the run knew a pixel size. An
    image layer without one (a JPEG opened by napari or by our reader) lives in
    pixels times its own ``scale``; when the user typed the µm/px into the
    Analyse widget, the results must follow the image, not the other way round,
    or they land as a tiny patch in its corner. Returns new kwargs.

    Examples
    --------
    >>> class Img:  # a JPEG layer: pixels, no units
    ...     scale, translate, units, metadata = (1.0, 1.0), (0.0, 0.0), ("pixel", "pixel"), {}
    >>> kw = in_image_world({"scale": (0.16, 0.16), "translate": (8.0, 0.0), "units": ("um", "um")},
    ...                     Img(), 0.08)
    >>> kw["scale"], kw["translate"], "units" in kw
    ((2.0, 2.0), (100.0, 0.0), False)
    """
    if not mpp0 or "units" not in kwargs or layer_mpp(image_layer) is not None:
        return kwargs
    sy, sx = (float(v) for v in image_layer.scale[-2:])
    ty, tx = (float(v) for v in image_layer.translate[-2:])
    scale = kwargs.get("scale", (1.0, 1.0))
    translate = kwargs.get("translate", (0.0, 0.0))
    out = {k: v for k, v in kwargs.items() if k != "units"}
    out["scale"] = (float(scale[0]) / mpp0 * sy, float(scale[1]) / mpp0 * sx)
    out["translate"] = (float(translate[0]) / mpp0 * sy + ty, float(translate[1]) / mpp0 * sx + tx)
    return out


def review_box(row, *, mpp: float | None, context: float = 4.0,
               min_um: float = 60.0) -> tuple[float, float, float, float]:
    """Level-0 box framing an object for review: ``context`` times its bounding box, at
    least ``min_um`` (or ``2 * min_um`` pixels without a pixel size), centred on it.

    Examples
    --------
    >>> review_box({"y": 100.0, "x": 50.0, "bbox_y0": 95, "bbox_x0": 40, "bbox_y1": 105,
    ...             "bbox_x1": 60}, mpp=0.5, min_um=20.0)
    (60.0, 10.0, 140.0, 90.0)
    """
    size = 0.0
    try:
        size = max(float(row["bbox_y1"]) - float(row["bbox_y0"]),
                   float(row["bbox_x1"]) - float(row["bbox_x0"]))
    except (KeyError, TypeError, ValueError):
        pass
    side = max(context * (size if np.isfinite(size) else 0.0),
               min_um / mpp if mpp else 2 * min_um)
    y, x = float(row["y"]), float(row["x"])
    return (y - side / 2, x - side / 2, y + side / 2, x + side / 2)


def level0_to_world(layer, y: float, x: float) -> tuple[float, float]:
    """World coordinates of level-0 pixel ``(y, x)`` of the image a result layer belongs to.

    Works whatever the layer's units (µm, or the image's pixels) and grid: an
    in-memory layer's data is on the level-0 grid from its ``origin``; a lazy
    whole-slide layer's data is the work grid, ``px0_per_data`` level-0 pixels
    per data pixel (recorded in its metadata).

    Examples
    --------
    >>> class L:
    ...     scale, translate = (2.0, 2.0), (100.0, 0.0)
    ...     metadata = {"napari_hemato": {"origin": [50, 0]}}
    >>> level0_to_world(L(), 60.0, 10.0)
    (120.0, 20.0)
    """
    (oy, ox), k, (sy, sx), (ty, tx) = _layer_frame(layer)
    # a work-grid pixel i covers level-0 [origin + i k, origin + (i + 1) k): its centre is
    # origin + (i + 0.5) k - 0.5, so level-0 p is at data (p - origin + 0.5) / k - 0.5
    dy, dx = (y - oy + 0.5) / k - 0.5, (x - ox + 0.5) / k - 0.5
    return (ty + dy * sy, tx + dx * sx)


def _layer_frame(layer):
    """``(origin, px0_per_data, scale, translate)`` of a result layer (level-0 origin of its
    data, level-0 pixels per data pixel, its last two scale and translate values)."""
    meta = layer.metadata.get(KEY, {})
    origin = tuple(float(v) for v in meta.get("origin", (0, 0)))
    return (origin, float(meta.get("px0_per_data", 1.0)),
            tuple(float(v) for v in layer.scale[-2:]),
            tuple(float(v) for v in layer.translate[-2:]))


def world_to_level0(layer, wy: float, wx: float) -> tuple[float, float]:
    """Level-0 pixel of world point ``(wy, wx)`` over a result layer (inverse of
    :func:`level0_to_world`)."""
    (oy, ox), k, (sy, sx), (ty, tx) = _layer_frame(layer)
    dy, dx = (wy - ty) / sy, (wx - tx) / sx
    return ((dy + 0.5) * k - 0.5 + oy, (dx + 0.5) * k - 0.5 + ox)


def camera_box_level0(layer, viewer) -> tuple[int, int, int, int]:
    """The level-0 box of what the camera shows, over a result layer (not clipped)."""
    (y0, x0), (y1, x1) = (world_to_level0(layer, *p) for p in camera_world_box(viewer))
    return (int(np.floor(y0 + 0.5)), int(np.floor(x0 + 0.5)),
            int(np.ceil(y1 + 0.5)), int(np.ceil(x1 + 0.5)))


def edit_window_layer_data(slide_layer, ann: AnnotationSet, *, name: str) -> tuple:
    """An editable Labels layer of an edit window (:func:`~napari_hemato.core.region_edit.
    open_window`) placed exactly over the whole-slide layer it was cut from, whatever that
    layer's units and grid."""
    data, kwargs, kind = annotation_layer_data(ann, name=name)
    _, k, (sy, sx), _ = _layer_frame(slide_layer)
    kwargs["scale"] = (sy / k, sx / k)
    kwargs["translate"] = level0_to_world(slide_layer, float(ann.origin[0]), float(ann.origin[1]))
    kwargs.pop("units", None)
    if _in_um(getattr(slide_layer, "units", ())):
        kwargs["units"] = ("um", "um")
    kwargs["opacity"] = 0.7
    return data, kwargs, kind


def tissue_layer_data(mask, image_layer, *, name: str) -> tuple:
    """An editable Labels layer (1 = tissue) of a :class:`~napari_hemato.core.tissue.TissueMask`,
    over ``image_layer`` whatever its units: mask pixel ``i`` covers level-0 pixels
    ``[i s, (i + 1) s)``, so its centre is level-0 ``(i + 0.5) s - 0.5``."""
    sy, sx = (float(v) for v in image_layer.scale[-2:])
    ty, tx = (float(v) for v in image_layer.translate[-2:])
    ky, kx = (float(v) for v in mask.scale)
    kwargs = {"name": name, "scale": (ky * sy, kx * sx), "opacity": 0.3,
              "translate": (ty + (0.5 * ky - 0.5) * sy, tx + (0.5 * kx - 0.5) * sx),
              "metadata": {KEY: {"role": "tissue", "source": mask.source}}}
    return mask.mask.astype(np.uint8), kwargs, "labels"
