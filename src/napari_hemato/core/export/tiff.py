"""uint32 label TIFF plus the object table as a CSV beside it.

``labels.tif`` holds the label image (zlib-compressed, tiled when large) with
its resolution in µm when the pixel size is known. Its ImageDescription is
tifffile's own JSON ("shaped") description, ``{"shape": [H, W], "napari_hemato":
{...}}``, so ``tifffile.imread`` (and scikit-image and imageio through it) read
the plain label array; the ``napari_hemato`` key holds the origin, class names,
pixel size and table dtypes.
``labels.csv`` holds the table (one row per label value).
:func:`export_result_tiff` streams a whole run's labels (no table) the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet, upsample_labels
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    class_names_from,
    from_header,
    header,
    read_table_csv,
    write_table_csv,
)
from napari_hemato.core.geometry import work_index

__all__ = ["export_result_tiff", "export_tiff", "import_tiff"]

log = logging.getLogger(__name__)

_TILE = 512
RESULT_TILE = 1024  # level-0 px per block when streaming a run's labels


def export_tiff(annotations: AnnotationSet, path: str | os.PathLike, *, overwrite: bool = False,
                base_dir: str | os.PathLike | None = None) -> Path:
    """Write the label image as a uint32 TIFF and the table as ``path.with_suffix(".csv")``.

    Parameters
    ----------
    annotations : AnnotationSet
        Instances with a label image.
    path : path
        The ``.tif`` file to write; the CSV goes beside it.
    overwrite : bool
        Replace existing files.
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The TIFF written (the table is ``path.with_suffix(".csv")``).

    Examples
    --------
    >>> export_tiff(cells, "cells.tif")  # doctest: +SKIP
    PosixPath('.../cells.tif')
    """
    import tifffile

    ann = annotations
    if ann.kind != "instances" or ann.labels is None:
        raise ExportError(f"cannot write {path}: a label TIFF needs instances with labels "
                          "(use export_points_csv for points)")
    dest = check_destination(path, overwrite=overwrite, base_dir=base_dir)
    csv = check_destination(dest.with_suffix(".csv"), overwrite=overwrite, base_dir=base_dir)
    if csv == dest:
        raise ExportError(f"cannot write {dest}: the label image needs a suffix other than .csv")
    labels = np.ascontiguousarray(ann.labels, np.uint32)
    kwargs: dict = {}
    if ann.mpp:
        kwargs = dict(resolution=(1e4 / ann.mpp, 1e4 / ann.mpp), resolutionunit="CENTIMETER")
    if max(labels.shape) > 2 * _TILE:
        kwargs["tile"] = (_TILE, _TILE)
    with atomic_outputs([csv, dest], overwrite=overwrite) as (tmp_csv, tmp_tif):
        write_table_csv(ann.table, tmp_csv)
        tifffile.imwrite(tmp_tif, labels, photometric="minisblack", compression="zlib",
                         metadata={"napari_hemato": header(ann)}, software="napari-hemato",
                         bigtiff=labels.nbytes > 2**31, **kwargs)
    return dest


def import_tiff(path: str | os.PathLike) -> AnnotationSet:
    """Read a label TIFF (and its CSV table) written by :func:`export_tiff`.

    Foreign label TIFFs work too: without the JSON description the origin is
    (0, 0) and the pixel size comes from the resolution tags; without a CSV
    the table holds only the label ids.

    Returns
    -------
    AnnotationSet

    Examples
    --------
    >>> ann = import_tiff("cells.tif")  # doctest: +SKIP
    >>> ann.labels.dtype, ann.origin  # doctest: +SKIP
    (dtype('uint32'), (40, 60))
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(path, "label TIFF", _read_tiff)


def _read_tiff(path) -> AnnotationSet:
    """:func:`import_tiff`, checking every value a hostile file could abuse."""
    import tifffile

    from napari_hemato.core.export import _atomic as g

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            if len(page.shape) != 2:
                raise ExportError(f"{path}: not a 2-D label image (shape {page.shape})")
            g.check_label_shape(page.shape, path)  # before decoding: the header may lie
            labels = page.asarray()
            description = page.description or ""
            resolution, unit = page.resolution, int(page.resolutionunit)
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise ExportError(f"cannot read label TIFF {path}: {exc}") from exc
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ExportError(f"{path}: not a 2-D integer label image ({labels.dtype}, {labels.shape})")
    if labels.size and (labels.min() < 0 or labels.max() > g.MAX_LABEL_ID):
        raise ExportError(f"{path}: label values {labels.min()}..{labels.max()} are out of range "
                          f"(0..{g.MAX_LABEL_ID})")
    try:
        head = json.loads(description).get("napari_hemato") or {}
    except (ValueError, AttributeError):
        head = {}
    if not head:
        um = {3: 1e4, 2: 25400.0}.get(unit)
        mpp = um / resolution[0] if um and resolution[0] > 0 else None
        head = {"kind": "instances", "origin": [0, 0], "mpp": mpp}
    csv = path.with_suffix(".csv")
    if csv.exists():
        table = read_table_csv(csv, head.get("dtypes"))
        if head.get("columns"):
            table = table[head["columns"]]
    else:
        log.warning("%s: no table %s beside it; the table holds label ids only", path, csv.name)
        ids = np.unique(labels)
        table = pd.DataFrame({"id": ids[ids != 0].astype(np.int64)})
    if "id" in table:
        g.check_ids(table["id"], path)
    if not head.get("class_names"):
        head["class_names"] = class_names_from(table)
    return from_header(head, table, labels.astype(np.uint32, copy=False))


def _level0_tiles(result, tile: int) -> Iterator[np.ndarray]:
    grid = result.grid
    labels = result.labels()
    ry0, rx0, ry1, rx1 = grid.roi
    f = grid.factor
    for y0 in range(0, ry1 - ry0, tile):
        for x0 in range(0, rx1 - rx0, tile):
            h, w = min(tile, ry1 - ry0 - y0), min(tile, rx1 - rx0 - x0)
            wy0, wx0 = int(work_index(y0, f)), int(work_index(x0, f))
            wy1 = min(int(work_index(y0 + h - 1, f)) + 1, grid.shape[0])
            wx1 = min(int(work_index(x0 + w - 1, f)) + 1, grid.shape[1])
            work = np.asarray(labels[wy0:wy1, wx0:wx1])
            block = np.zeros((tile, tile), np.uint32)
            block[:h, :w] = upsample_labels(work, f, (h, w), (y0, x0), (wy0, wx0))
            yield block


def export_result_tiff(result, path: str | os.PathLike, *, overwrite: bool = False,
                      tile: int = RESULT_TILE) -> Path:
    """Stream a run's labels to a uint32 (Big)TIFF on the input's level-0 pixel grid.

    The run's labels live on the model's work grid; they are mapped tile by tile onto
    level 0 (nearest neighbour), so whole slides are written with bounded memory.
    ``labels[0, 0]`` of the TIFF is level-0 pixel ``(roi_y0, roi_x0)``, also recorded in
    the description (the same kind as :func:`export_tiff`'s). The CLI's ``--labels``.

    Examples
    --------
    >>> export_result_tiff(result, "field_labels.tif")  # doctest: +SKIP
    """
    import tifffile

    if result.labels() is None:
        raise ValueError("a points result has no label image")
    dest = check_destination(path, overwrite=overwrite)
    grid = result.grid
    ry0, rx0, ry1, rx1 = grid.roi
    shape = (ry1 - ry0, rx1 - rx0)
    kwargs = {}
    if not grid.mpp_assumed:
        kwargs = dict(resolution=(1e4 / grid.mpp0, 1e4 / grid.mpp0), resolutionunit="CENTIMETER")
    head = {"napari_hemato": {
        "origin": [ry0, rx0], "mpp": None if grid.mpp_assumed else grid.mpp0,
        "image_path": result.store.config["slide"]["path"], "result": str(result.path),
    }}
    with atomic_outputs([dest], overwrite=overwrite) as (tmp,):
        tifffile.imwrite(tmp, _level0_tiles(result, tile), shape=shape, dtype=np.uint32,
                         tile=(tile, tile), compression="zlib", photometric="minisblack",
                         bigtiff=shape[0] * shape[1] * 4 > 2**31, metadata=head,
                         software="napari-hemato", **kwargs)
    return dest
