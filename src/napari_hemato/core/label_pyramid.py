"""Lower-resolution copies of a result's labels, so a viewer draws a whole slide from a few
megapixels.

``labels/1``, ``labels/2``, ... each keep every second pixel of the level above (nearest:
label values are ids, never averaged) until the longer side is at most :data:`TOP_SIDE`.
napari opens the list as a multiscale Labels layer and reads only the tiles of the level
the zoom needs; without it, a 1 GP result was read whole (4 GB) before the first draw.

The levels are derived data: the engine builds them when a run completes, a mask edit saved
into the store updates them over its box (:func:`update`), and :func:`ensure` rebuilds them
for a store made before they existed. The NGFF ``multiscales`` metadata lists them with
their scales.

>>> level_shapes((5000, 3000))
[(5000, 3000), (2500, 1500), (1250, 750)]
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: the smallest level's longer side is at most this
TOP_SIDE = 2048
#: rows and columns of a level written per block (bounds memory: 4 × this² × 4 bytes read)
BLOCK = 2048
_ATTR = "napari_hemato_levels"


def level_shapes(shape) -> list[tuple[int, int]]:
    """Shapes of level 0, 1, ... (each half the one above, rounded up)."""
    shapes = [tuple(int(v) for v in shape)]
    while max(shapes[-1]) > TOP_SIDE:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def levels(group) -> list:
    """The label arrays of a store's ``labels`` group, level 0 first (only level 0 when the
    pyramid was never built or is unfinished)."""
    labels = group["labels"]
    n = int(labels.attrs.get(_ATTR, 1))
    return [labels[str(k)] for k in range(n) if str(k) in labels] or [labels["0"]]


def build(group) -> int:
    """(Re)build every level below level 0; returns how many levels there are."""
    labels = group["labels"]
    base = labels["0"]
    shapes = level_shapes(base.shape)
    labels.attrs[_ATTR] = 1  # unfinished until the last level is written
    for k in range(1, len(shapes)):
        if str(k) in labels:
            del labels[str(k)]
        chunk = min(base.chunks[0], BLOCK)
        labels.create_array(str(k), shape=shapes[k], chunks=(chunk, chunk), dtype=base.dtype,
                            fill_value=0)
        _downsample(labels[str(k - 1)], labels[str(k)], (0, 0) + shapes[k])
    _write_multiscales(labels, len(shapes))
    labels.attrs[_ATTR] = len(shapes)
    return len(shapes)


def update(group, box) -> None:
    """Bring the levels up to date over level-0 ``box`` (y0, x0, y1, x1) after an edit."""
    labels = group["labels"]
    n = int(labels.attrs.get(_ATTR, 1))
    y0, x0, y1, x1 = (int(v) for v in box)
    for k in range(1, n):
        y0, x0, y1, x1 = y0 // 2, x0 // 2, -(-y1 // 2), -(-x1 // 2)
        dst = labels[str(k)]
        _downsample(labels[str(k - 1)], dst, (y0, x0, min(y1, dst.shape[0]), min(x1, dst.shape[1])))


def ensure(group) -> bool:
    """Build the levels of a store that has none yet (a run made before they existed, or a
    build a killed process left unfinished); True when it built them."""
    labels = group["labels"]
    if int(labels.attrs.get(_ATTR, 1)) == len(level_shapes(labels["0"].shape)):
        return False
    log.info("%s: building the labels' lower-resolution levels", getattr(group, "store", group))
    build(group)
    return True


def _downsample(src, dst, box) -> None:
    """``dst[box] = src[2y, 2x]`` for the level box ``box``, block by block."""
    y0, x0, y1, x1 = box
    for by in range(y0, y1, BLOCK):
        for bx in range(x0, x1, BLOCK):
            ey, ex = min(by + BLOCK, y1), min(bx + BLOCK, x1)
            block = np.asarray(src[2 * by:2 * ey:2, 2 * bx:2 * ex:2])
            dst[by:ey, bx:ex] = block[: ey - by, : ex - bx]


def _write_multiscales(labels, n: int) -> None:
    multiscales = labels.attrs.get("multiscales")
    if not multiscales:
        return
    ms = [dict(m) for m in multiscales]
    first = ms[0]["datasets"][0]
    transforms = {t["type"]: t for t in first["coordinateTransformations"]}
    scale = [float(v) for v in transforms["scale"]["scale"]]
    shift = [float(v) for v in transforms.get("translation", {"translation": [0.0, 0.0]})["translation"]]
    datasets = []
    for k in range(n):
        f = 2.0**k
        # pixel centres: level k's pixel 0 is level 0's pixel 0 (nearest keeps even pixels)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [s * f for s in scale]},
            {"type": "translation", "translation": shift}]})
    ms[0]["datasets"] = datasets
    labels.attrs["multiscales"] = ms
