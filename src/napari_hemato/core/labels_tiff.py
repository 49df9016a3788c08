"""Stream a run's instance labels to a uint32 TIFF on the input's level-0 pixel grid.

The run's labels live on the model's work grid; this maps them tile by tile
onto level 0 (nearest neighbour), so whole slides are written with bounded
memory. ``labels[0, 0]`` of the TIFF is level-0 pixel ``(roi_y0, roi_x0)``
(the origin is also recorded in the ImageDescription: tifffile's own JSON
description, ``{"shape": [H, W], "napari_hemato": {...}}``, which tifffile,
scikit-image and imageio read as the plain label array).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from napari_hemato.core.annotations import upsample_labels
from napari_hemato.core.export._atomic import atomic_outputs, check_destination
from napari_hemato.core.geometry import work_index

TILE = 1024


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


def write_labels_tiff(result, path: str | os.PathLike, *, overwrite: bool = False,
                      tile: int = TILE) -> Path:
    """Write ``result``'s labels as a tiled, zlib-compressed uint32 (Big)TIFF.

    Examples
    --------
    >>> write_labels_tiff(result, "field_labels.tif")  # doctest: +SKIP
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
