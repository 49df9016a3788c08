"""Where the tissue is: a low-resolution mask of an H&E slide, and the tiles it touches.

:func:`detect_tissue` reads one pyramid level near :data:`MASK_MPP` µm/px block by block
(never level 0 whole: a level finer than that is averaged down as it is read), then:

1. **Tissue vs glass.** A pixel is tissue when its saturation *or* its optical density
   is above a threshold: Otsu's over the slide, held between absolute floors and caps
   (:data:`SAT_RANGE`, :data:`OD_RANGE`). On a blank slide Otsu splits noise; the floors
   keep such a slide empty instead.
2. **Pen and dirt.** Strongly green/cyan or blue pixels (ink: no H&E stain has those
   hues) and near-black ones are removed, with a small ring around them.
3. **Clean-up.** A closing joins loose stroma, holes smaller than :data:`HOLE_UM2` are
   filled and parts smaller than :data:`SPECK_UM2` (dust, debris) removed, unless they
   touch the image's edge: tissue cut by the edge goes on beyond it (a small H&E tile or
   a crop is all one such part, however small).

A :class:`TissueMask` is the boolean mask with its scale (level-0 pixels per mask
pixel); :meth:`TissueMask.touching` tells, for tiles' level-0 boxes, which touch
tissue (with a margin), and :func:`tiles_off_tissue` is what the engine skips.

Examples
--------
>>> m = TissueMask(np.eye(4, dtype=bool), scale=(10.0, 10.0), mpp0=0.5)
>>> m.area_mm2, m.touches((0, 0, 5, 5)), m.touches((0, 25, 5, 40)), m.touches((0, 25, 5, 40), margin=10)
(0.0001, True, False, True)
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.tiling import Box

log = logging.getLogger(__name__)

MASK_MPP = 8.0  #: µm per mask pixel aimed at
ASSUMED_MPP0 = 0.5  #: level-0 µm/px assumed for a slide that states none (20×)
SAT_RANGE = (0.07, 0.15)  #: Otsu's saturation threshold is held in this range
OD_RANGE = (0.25, 0.6)  #: Otsu's optical-density (mean of RGB) threshold is held here
SPECK_UM2 = 5_000.0  #: smaller parts are dust or debris
HOLE_UM2 = 50_000.0  #: smaller holes are filled
CLOSE_UM = 16.0  #: radius of the closing that joins loose stroma
PEN_RING_UM = 16.0  #: pen marks are removed with this much around them
_READ_BLOCK = 2048  #: level pixels read at a time (a side)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask over a whole slide, at low resolution.

    Attributes
    ----------
    mask : (h, w) bool array
        True where there is tissue; mask pixel ``(i, j)`` covers level-0 pixels
        ``[i * sy, (i + 1) * sy) x [j * sx, (j + 1) * sx)``.
    scale : (float, float)
        ``(sy, sx)``: level-0 pixels per mask pixel.
    mpp0 : float or None
        The slide's level-0 µm/px (None when unknown: no areas then).
    source : str
        ``"auto"`` (detected), ``"file:PATH"`` or ``"array"``.
    """

    mask: np.ndarray
    scale: tuple[float, float]
    mpp0: float | None = None
    source: str = "auto"

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or 0 in mask.shape:
            raise ValueError(f"a tissue mask is a non-empty 2-D array, got shape {mask.shape}")
        object.__setattr__(self, "mask", mask.astype(bool, copy=False))
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        object.__setattr__(self, "_sums", None)

    @classmethod
    def from_array(cls, mask, slide_shape: tuple[int, int], *, mpp0: float | None = None,
                   source: str = "array") -> TissueMask:
        """A mask covering a whole slide of level-0 ``slide_shape``, at any resolution."""
        mask = np.asarray(mask)
        if mask.ndim != 2 or 0 in mask.shape:
            raise ValueError(f"a tissue mask is a non-empty 2-D array, got shape {mask.shape}")
        h0, w0 = slide_shape
        return cls(mask, (h0 / mask.shape[0], w0 / mask.shape[1]), mpp0, source)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    @property
    def mpp(self) -> float | None:
        """µm per mask pixel (mean of the two axes)."""
        return None if self.mpp0 is None else self.mpp0 * (self.scale[0] + self.scale[1]) / 2

    @property
    def empty(self) -> bool:
        return not self.mask.any()

    @property
    def area_mm2(self) -> float | None:
        """Tissue area over the whole slide (None when the pixel size is unknown)."""
        return self._area(int(self.mask.sum()))

    def area_mm2_in(self, box: Box, *, mpp0: float | None = None) -> float | None:
        """Tissue area inside level-0 ``box`` (mask pixels whose centre lies in it), at the
        mask's ``mpp0`` or the one given."""
        y0, x0, y1, x1 = box
        sy, sx = self.scale
        rows = slice(max(math.ceil(y0 / sy - 0.5), 0), max(math.ceil(y1 / sy - 0.5), 0))
        cols = slice(max(math.ceil(x0 / sx - 0.5), 0), max(math.ceil(x1 / sx - 0.5), 0))
        return self._area(int(self.mask[rows, cols].sum()), mpp0)

    def _area(self, n: int, mpp0: float | None = None) -> float | None:
        mpp0 = mpp0 or self.mpp0
        if mpp0 is None:
            return None
        return n * self.scale[0] * self.scale[1] * mpp0**2 / 1e6

    def touches(self, box: Box, *, margin: float = 0.0) -> bool:
        """Whether level-0 ``box`` (y0, x0, y1, x1), grown by ``margin`` px, touches tissue."""
        return bool(self.touching(np.asarray([box], np.float64), margin=margin)[0])

    def touching(self, boxes: np.ndarray, *, margin: float = 0.0) -> np.ndarray:
        """:meth:`touches` for ``(n, 4)`` level-0 boxes at once (a summed-area table)."""
        if self._sums is None:
            sums = np.zeros((self.shape[0] + 1, self.shape[1] + 1), np.int64)
            sums[1:, 1:] = self.mask.cumsum(0).cumsum(1)
            object.__setattr__(self, "_sums", sums)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        sy, sx = self.scale
        h, w = self.shape
        y0 = np.clip(np.floor((b[:, 0] - margin) / sy), 0, h).astype(np.int64)
        x0 = np.clip(np.floor((b[:, 1] - margin) / sx), 0, w).astype(np.int64)
        y1 = np.clip(np.ceil((b[:, 2] + margin) / sy), 0, h).astype(np.int64)
        x1 = np.clip(np.ceil((b[:, 3] + margin) / sx), 0, w).astype(np.int64)
        s = self._sums
        total = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return (total > 0) & (y1 > y0) & (x1 > x0)

    def identity(self) -> dict:
        """What a resumed run must match: the mask's digest, shape and scale."""
        packed = np.packbits(self.mask, axis=None).tobytes()
        digest = hashlib.sha256(repr((self.shape, self.scale)).encode() + packed).hexdigest()
        return {"sha256": digest, "shape": list(self.shape), "scale": list(self.scale)}


def tile_boxes_level0(plan, grid) -> np.ndarray:
    """Level-0 ``(n, 4)`` boxes of every tile's core (work grid -> slide pixels)."""
    idx = np.arange(len(plan))
    rows, cols = np.divmod(idx, plan.grid[1])
    y0, x0 = rows * plan.tile, cols * plan.tile
    y1, x1 = np.minimum(y0 + plan.tile, plan.shape[0]), np.minimum(x0 + plan.tile, plan.shape[1])
    f = grid.factor
    oy, ox = grid.roi[:2]
    return np.column_stack([oy + y0 * f, ox + x0 * f, oy + y1 * f, ox + x1 * f]).astype(np.float64)


def tiles_off_tissue(plan, grid, tissue: TissueMask) -> set[int]:
    """Tiles whose core, grown by the halo, touches no tissue (the engine skips them)."""
    touch = tissue.touching(tile_boxes_level0(plan, grid), margin=plan.halo * grid.factor)
    return {int(i) for i in np.flatnonzero(~touch)}


# -- detection ----------------------------------------------------------------------------------
def read_thumbnail(slide, mpp: float = MASK_MPP, *, box: Box | None = None
                   ) -> tuple[np.ndarray, tuple[float, float], tuple[int, int], tuple[int, int]]:
    """The slide at about ``mpp`` µm/px as float32 RGB (0-255).

    Reads the coarsest pyramid level not coarser than ``mpp``, in blocks, averaging
    ``f × f`` level pixels into one (so level 0 is never held whole). With ``box``
    (level-0 y0, x0, y1, x1) only the thumbnail pixels covering it are read.
    Returns the pixels, the scale ``(sy, sx)`` (level-0 px per thumbnail px), the
    offset of the pixels returned in the whole slide's thumbnail and that one's shape.
    """
    from napari_hemato.core.slide import to_rgb8

    mpp0 = slide.mpp or ASSUMED_MPP0
    want = mpp / mpp0  # level-0 px per thumbnail px
    downs = slide.downsamples
    fine = [i for i, d in enumerate(downs) if d <= want * 1.05]
    level = max(fine, key=lambda i: downs[i]) if fine else 0
    f = max(1, int(want / downs[level] + 0.5))
    lh, lw = (int(s) for s in slide.levels[level].shape[:2])
    h0, w0 = slide.shape
    dy, dx = h0 / lh, w0 / lw  # level-0 px per level px
    oh, ow = math.ceil(lh / f), math.ceil(lw / f)
    by0, bx0, by1, bx1 = box if box is not None else (0, 0, h0, w0)
    r0, c0 = max(int(by0 / dy) // f, 0), max(int(bx0 / dx) // f, 0)
    r1, c1 = min(math.ceil(by1 / dy / f), oh), min(math.ceil(bx1 / dx / f), ow)
    r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
    out = np.empty((r1 - r0, c1 - c0, 3), np.float32)
    step = f * max(1, _READ_BLOCK // f)
    for y in range(r0 * f, min(r1 * f, lh), step):
        for x in range(c0 * f, min(c1 * f, lw), step):
            y1, x1 = min(y + step, lh, r1 * f), min(x + step, lw, c1 * f)
            block = to_rgb8(slide.read_region(level, y, x, y1, x1))
            hb, wb = math.ceil((y1 - y) / f), math.ceil((x1 - x) / f)
            pad = ((0, hb * f - block.shape[0]), (0, wb * f - block.shape[1]), (0, 0))
            if any(p[1] for p in pad):
                block = np.pad(block, pad, mode="edge")
            means = block.reshape(hb, f, wb, f, 3).astype(np.float32).mean(axis=(1, 3))
            out[y // f - r0 : y // f - r0 + hb, x // f - c0 : x // f - c0 + wb] = means
    return out, (h0 / (lh / f), w0 / (lw / f)), (r0, c0), (oh, ow)


def colour_features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(saturation, optical density, hue in degrees, max channel)`` of float RGB 0-255."""
    rgb = np.clip(np.asarray(rgb, np.float32), 0, 255)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    od = -np.log10((rgb + 1.0) / 256.0).mean(axis=-1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0
    return sat, od, hue, mx


def _otsu(values: np.ndarray, lo: float, hi: float) -> float:
    """Otsu's threshold of ``values``, held in ``[lo, hi]`` (``lo`` when they are flat)."""
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size < 2 or float(np.ptp(values)) < 1e-6:
        return lo
    return float(np.clip(threshold_otsu(values), lo, hi))


def pen_marks(rgb: np.ndarray) -> np.ndarray:
    """Ink and dirt: green/cyan or strong blue hues (no H&E stain has them), near-black."""
    sat, _, hue, mx = colour_features(rgb)
    green = (hue >= 70) & (hue < 200) & (sat > 0.15)
    blue = (hue >= 200) & (hue < 240) & (sat > 0.3)
    black = mx < 60
    return green | blue | black


def tissue_from_rgb(rgb: np.ndarray, *, px_um: float) -> tuple[np.ndarray, dict]:
    """Tissue mask of a low-resolution RGB image (float 0-255) of ``px_um`` µm/px.

    Returns the mask and what was decided (thresholds, pen fraction), for logs.
    """
    sat, od, _, _ = colour_features(rgb)
    t_sat = _otsu(sat, *SAT_RANGE)
    t_od = _otsu(od, *OD_RANGE)
    mask = (sat > t_sat) | (od > t_od)
    pen = pen_marks(rgb)
    if pen.any():
        ring = max(1, round(PEN_RING_UM / px_um))
        pen = ndi.binary_dilation(pen, iterations=ring)
        mask &= ~pen
    close = round(CLOSE_UM / px_um)
    if close >= 1:
        disk = _disk(close)
        padded = np.pad(mask, close)  # the closing must not grow tissue from the image's edge
        mask = ndi.binary_closing(padded, structure=disk)[close:-close, close:-close] & ~pen
    mask = _fill_small_holes(mask, HOLE_UM2 / px_um**2)
    mask = _remove_small(mask, SPECK_UM2 / px_um**2)
    info = {"saturation_threshold": round(t_sat, 4), "od_threshold": round(t_od, 4),
            "pen_fraction": round(float(pen.mean()), 5)}
    return mask, info


def detect_tissue(slide, *, mpp: float = MASK_MPP, roi: Box | None = None) -> TissueMask:
    """The tissue mask of an H&E ``slide`` (see the module docstring for how).

    Parameters
    ----------
    slide : Slide
        An opened slide (:func:`napari_hemato.core.slide.open_slide`).
    mpp : float
        µm per mask pixel aimed at (the nearest pyramid level is averaged to it).
    roi : (y0, x0, y1, x1), optional
        Look only in this level-0 region (the mask is empty elsewhere).

    Examples
    --------
    >>> mask = detect_tissue(open_slide("slide.svs"))  # doctest: +SKIP
    >>> mask.area_mm2, mask.mpp  # doctest: +SKIP
    (1.21, 7.98)
    """
    rgb, scale, (r0, c0), shape = read_thumbnail(slide, mpp, box=roi)
    px_um = (slide.mpp or ASSUMED_MPP0) * (scale[0] + scale[1]) / 2
    found, info = tissue_from_rgb(rgb, px_um=px_um)
    mask = np.zeros(shape, bool)
    mask[r0 : r0 + found.shape[0], c0 : c0 + found.shape[1]] = found
    tissue = TissueMask(mask, scale, slide.mpp, "auto")
    log.info("%s: tissue %.1f %% of a %s mask at %.2f µm/px (%s)", slide.path,
             100 * mask.mean(), mask.shape, px_um, info)
    return tissue


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without its parts smaller than ``min_px`` that lie inside the image (a part
    touching the edge is kept: it may go on beyond it)."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[edge] = False  # background touching the border is glass, not a hole
    return mask | fill[holes]
