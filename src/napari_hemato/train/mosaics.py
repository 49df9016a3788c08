"""Validation mosaics for mitosis detection: held-out crops pasted on held-out tissue.

:func:`make_mosaics` pastes held-out crops at random places on a patchwork of
held-out tissue, so the position of a figure is not given away by the layout.
No torch here: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_hemato.train.data_mitosis import Crops, tissue_mask

__all__ = ["Mosaic", "make_mosaics"]


@dataclass
class Mosaic:
    """A synthetic evaluation image: ``points`` (n, 2) figure centres, ``labels``
    (n,) classes, ``crop_names`` (n,), all in the mosaic's pixels."""

    image: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    crop_names: np.ndarray


def _background(size: int, tissue: list[np.ndarray], rng, block: int) -> np.ndarray:
    canvas = np.full((size, size, 3), 255, np.uint8)
    usable = [t for t in tissue if min(t.shape[:2]) >= block]
    if not usable:
        return canvas
    for y in range(0, size, block):
        for x in range(0, size, block):
            for _ in range(20):
                t = usable[int(rng.integers(len(usable)))]
                ty = int(rng.integers(t.shape[0] - block + 1))
                tx = int(rng.integers(t.shape[1] - block + 1))
                win = t[ty : ty + block, tx : tx + block]
                if tissue_mask(win).mean() > 0.5:
                    break
            canvas[y : y + block, x : x + block] = win[: size - y, : size - x]
    return canvas


def _feather(h: int, w: int, ramp: int) -> np.ndarray:
    ay = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / (ramp + 1)
    ax = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / (ramp + 1)
    return np.clip(np.minimum.outer(ay, ax), 0, 1)[..., None]


def _paste(canvas: np.ndarray, patch: np.ndarray, y: int, x: int, ramp: int) -> None:
    h, w = patch.shape[:2]
    a = _feather(h, w, ramp)
    region = canvas[y : y + h, x : x + w].astype(np.float32)
    canvas[y : y + h, x : x + w] = np.round(a * patch + (1 - a) * region).astype(np.uint8)


def _place(n: int, size: int, patch: int, gap: int, rng) -> list[tuple[int, int]]:
    spots: list[tuple[int, int]] = []
    for _ in range(2000):
        if len(spots) == n:
            break
        y, x = (int(v) for v in rng.integers(0, size - patch + 1, 2))
        if all(max(abs(y - a), abs(x - b)) >= patch + gap for a, b in spots):
            spots.append((y, x))
    return spots


def make_mosaics(crops: Crops, tissue: list[np.ndarray], *, size: int = 1024, per_mosaic: int = 8,
                 decoys: int = 2, block: int = 256, ramp: int = 6, gap: int = 24, seed: int = 0
                 ) -> list[Mosaic]:
    """Evaluation canvases: crops at random places on held-out tissue.

    The background is a patchwork of ``block``-px windows (mostly tissue) of
    the ``tissue`` images (white if there are none). Each crop of ``crops`` is
    used once, ``per_mosaic`` per canvas, at non-overlapping random positions
    at least ``gap`` px apart, blended in with a ``ramp``-px linear border;
    ``decoys`` crop-sized windows of tissue are pasted the same way, so a
    pasted square does not imply a mitosis. All arrays share the crops' pixel
    size; the ground truth is each crop's figure centre.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(crops))
    s = crops.images.shape[1]
    out = []
    for k in range(0, len(order), per_mosaic):
        idx = order[k : k + per_mosaic]
        canvas = _background(size, tissue, rng, block)
        spots = _place(len(idx) + decoys, size, s, gap, rng)
        if len(spots) < len(idx):
            raise ValueError(f"cannot place {len(idx)} crops of {s} px on a {size} px canvas")
        perm = rng.permutation(len(spots))
        spots = [spots[i] for i in perm]
        points = []
        for i, (y, x) in zip(idx, spots, strict=False):
            _paste(canvas, crops.images[i], y, x, ramp)
            points.append((y + crops.centres[i][0], x + crops.centres[i][1]))
        usable = [t for t in tissue if min(t.shape[:2]) >= s]
        for y, x in spots[len(idx):]:
            if usable:
                t = usable[int(rng.integers(len(usable)))]
                ty, tx = int(rng.integers(t.shape[0] - s + 1)), int(rng.integers(t.shape[1] - s + 1))
                _paste(canvas, t[ty : ty + s, tx : tx + s], y, x, ramp)
        out.append(Mosaic(canvas, np.asarray(points, float).reshape(-1, 2), crops.labels[idx],
                          crops.names[idx]))
    return out
