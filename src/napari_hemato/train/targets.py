"""Dense training targets from annotations (numpy, scipy, scikit-image; no torch).

- :func:`distance_target` (from :mod:`napari_hemato.core.postprocess`, where the
  runtime fine-tune reads it too): per-object distance to the border, scaled to 1 at
  the centre (the nucleus and smear models' ``distance`` output);
- :func:`pseudo_masks`: instance pseudo-masks from blood-smear boxes
  (:class:`Box`), see :mod:`napari_hemato.train.data_smear` for the rules, with
  :func:`complete_box` and :func:`colour_foreground`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.postprocess import distance_target  # noqa: F401 - the training target

CLASS_NAMES = ("RBC", "WBC", "Platelets")
#: the model works at 2× downsampled BCCD fields
MODEL_MPP = 0.16
#: mask priority when masks overlap (higher wins)
PRIORITY = {"RBC": 0, "WBC": 1, "Platelets": 2}
#: typical box side (µm) used to complete boxes cut by the image border
TYPICAL_SIZE_UM = {"RBC": 8.2, "WBC": 15.0, "Platelets": 3.2}

@dataclass(frozen=True)
class Box:
    """One annotated box, half-open pixel coordinates ``(y0, x0, y1, x1)``."""

    cls: str
    y0: float
    x0: float
    y1: float
    x1: float

    def scaled(self, f: float) -> Box:
        return Box(self.cls, self.y0 * f, self.x0 * f, self.y1 * f, self.x1 * f)

    @property
    def yxyx(self) -> tuple[float, float, float, float]:
        return (self.y0, self.x0, self.y1, self.x1)


# -- colour foreground ---------------------------------------------------------
def colour_foreground(image: np.ndarray, *, mpp: float = MODEL_MPP) -> np.ndarray:
    """Cells (any class) vs. the pale smear background, holes filled.

    The background is the brightest, least saturated part of a field. Its
    colour is estimated from the 30 % brightest pixels; a pixel is foreground
    when its smoothed colour is darker than that in green/blue (haemoglobin,
    eosin and nuclear stain all absorb there) by more than an Otsu cut-off
    (bounded to 10–40 grey levels), or clearly more saturated.
    """
    from skimage.filters import threshold_otsu

    img = ndi.gaussian_filter(image.astype(np.float32), sigma=(1.0, 1.0, 0))
    gb = 0.5 * (img[..., 1] + img[..., 2])
    bright = gb >= np.percentile(gb, 70)
    bg = np.median(img[bright], axis=0)
    dark = 0.5 * (bg[1] + bg[2]) - gb
    sat = img.max(-1) - img.min(-1)
    bg_sat = float(np.percentile(sat[bright], 50))
    try:
        t = float(threshold_otsu(dark))
    except ValueError:
        t = 15.0
    t = float(np.clip(t, 10.0, 40.0))
    fg = (dark > t) | (sat - bg_sat > 2.0 * t)
    r = max(1, int(round(0.3 / mpp)))
    fg = ndi.binary_opening(fg, iterations=r)
    fg = ndi.binary_closing(fg, iterations=r)
    fg = ndi.binary_fill_holes(fg)
    return fg


# -- pseudo masks ----------------------------------------------------------------
def complete_box(box: Box, shape: tuple[int, int], mpp: float) -> Box:
    """Extend a box cut by the image border to a plausible full cell (may leave the image)."""
    h, w = shape
    y0, x0, y1, x1 = box.yxyx
    bh, bw = y1 - y0, x1 - x0
    typical = TYPICAL_SIZE_UM[box.cls] / mpp
    at_top, at_bottom, at_left, at_right = y0 <= 1, y1 >= h - 1, x0 <= 1, x1 >= w - 1
    cut_y, cut_x = at_top or at_bottom, at_left or at_right
    target_h = bh if not cut_y else max(bh, bw if not cut_x else typical)
    target_w = bw if not cut_x else max(bw, bh if not cut_y else typical)
    if cut_y and not (at_top and at_bottom):
        if at_top:
            y0 = y1 - target_h
        else:
            y1 = y0 + target_h
    if cut_x and not (at_left and at_right):
        if at_left:
            x0 = x1 - target_w
        else:
            x1 = x0 + target_w
    return Box(box.cls, y0, x0, y1, x1)


def _ellipse_radius(box: Box, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Normalised elliptical radius (< 1 inside) of the ellipse inscribed in ``box``."""
    h, w = shape
    y0, x0, y1, x1 = box.yxyx
    sl = (slice(max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), h)),
          slice(max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), w)))
    cy, cx = 0.5 * (y0 + y1) - 0.5, 0.5 * (x0 + x1) - 0.5
    ry, rx = max(0.5 * (y1 - y0), 0.5), max(0.5 * (x1 - x0), 0.5)
    yy = (np.arange(sl[0].start, sl[0].stop, dtype=np.float32) - cy) / ry
    xx = (np.arange(sl[1].start, sl[1].stop, dtype=np.float32) - cx) / rx
    return sl, np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)


def pseudo_masks(
    boxes: list[Box], shape: tuple[int, int], fg: np.ndarray | None, *, mpp: float = MODEL_MPP,
    min_colour_fraction: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance pseudo-masks from boxes on a grid of ``shape``.

    Parameters
    ----------
    boxes : list of Box
        Boxes in the grid's pixel coordinates.
    shape : (int, int)
        Grid shape.
    fg : (H, W) bool, optional
        Colour foreground (:func:`colour_foreground`); refines RBC masks.
    mpp : float
        Grid pixel size (µm/px), to complete boxes cut by the border.
    min_colour_fraction : float
        An RBC mask is ``ellipse ∩ fg`` only if that keeps this fraction of
        the ellipse; otherwise the ellipse.

    Returns
    -------
    labels : (H, W) int32
        Instance ids 1..n in box order (a box may end up with no pixels).
    classes : (n + 1,) int
        Class index (into :data:`CLASS_NAMES`) per id; ``classes[0] = -1``.

    Examples
    --------
    >>> lab, cls = pseudo_masks([Box("WBC", 2, 2, 12, 12)], (16, 16), None)
    >>> int(lab.max()), cls.tolist()
    (1, [-1, 1])
    """
    from skimage.morphology import convex_hull_image

    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)  # (priority rank, radius) packed into one key
    classes = np.full(len(boxes) + 1, -1, np.int64)
    for k, box in enumerate(boxes, start=1):
        classes[k] = CLASS_NAMES.index(box.cls)
        full = complete_box(box, shape, mpp)
        sl, r = _ellipse_radius(full, shape)
        if r.size == 0:
            continue
        inside = r < 1.0
        if box.cls == "RBC" and fg is not None:
            refined = inside & fg[sl]
            if refined.sum() >= min_colour_fraction * inside.sum():
                refined = ndi.binary_fill_holes(refined)
                lab, n = ndi.label(refined)
                if n > 1:
                    sizes = np.bincount(lab.ravel())[1:]
                    refined = lab == (1 + int(np.argmax(sizes)))
                # convex: pale centres open to the rim must not notch the mask
                inside = convex_hull_image(refined) & inside
        key = np.where(inside, (2 - PRIORITY[box.cls]) * 10.0 + r, np.inf).astype(np.float32)
        win = key < best[sl]
        best[sl][win] = key[win]
        labels[sl][win] = k
    # keep the largest piece of each id (overlap rules can cut a mask in two)
    for k, s in enumerate(ndi.find_objects(labels), start=1):
        if s is None:
            continue
        m = labels[s] == k
        lab, n = ndi.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            labels[s][m & (lab != 1 + int(np.argmax(sizes)))] = 0
    return labels, classes
