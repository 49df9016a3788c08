"""Where a blood smear can be read: the monolayer, not the thick area or the feathered edge.

A smear is thick where the drop was laid (red cells stacked on one another, rouleaux), thin at
its feathered edge (cells sparse and flattened, white cells broken or pushed there), and
readable in between, where red cells lie side by side, touching, barely overlapping. A
differential is counted there. :func:`detect_reading_zone` finds that band on a scan as the
engine's tissue mask (:class:`~napari_hemato.core.tissue.TissueMask`), so tiles outside it
are not read, the summary reports its area and counts per mm² of it:

1. the glass colour and the density of one layer of red cells are measured once on patches
   of the scan at full resolution (:func:`napari_hemato.core.colour_match.colour_sample`);
2. the scan is read at :data:`ZONE_MPP` µm/px (averaged down from the nearest pyramid level,
   block by block, so a gigapixel scan is never held whole); each pixel's summed optical
   density against the glass is compared with one layer's: above half of it the pixel is
   **covered**, above :data:`OVERLAP_LAYERS` layers it is **overlapped** (cells stacked);
3. in windows of :data:`WINDOW_UM` µm, the fractions of covered and overlapped pixels decide:
   a window is readable when its coverage lies in :data:`COVERAGE_RANGE` and its overlap is
   at most :data:`MAX_OVERLAP`; isolated windows are dropped and small gaps filled.

The limits come from fields people chose to read in two labs' images (the BCCD smear fields
and the PBC CellaVision crops), read the same way: their coverage spans 0.35-0.66 and their
overlap at most 0.16 (see ``tests/test_reading_zone.py``); the range is wider than that on
both sides so that a readable field is never cut. An image with one pyramid level and at
most :data:`FIELD_PIXELS` pixels (a camera's frame) is a field chosen by a person: it is read
whole without looking; a scanner's pyramid or a larger image is judged.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.colour_match import DEFAULT_MIN_CELL_OD, _od, _stats, colour_sample
from napari_hemato.core.tiling import Box
from napari_hemato.core.tissue import ASSUMED_MPP0, TissueMask, _fill_small_holes, read_thumbnail

log = logging.getLogger(__name__)

ZONE_MPP = 2.0  #: µm per pixel the scan is judged at (a red cell is ~4 px across)
WINDOW_UM = 48.0  #: side of the windows coverage is measured in (a few dozen red cells)
COVERAGE_RANGE = (0.2, 0.8)  #: readable coverage (read fields: 0.35-0.66)
MAX_OVERLAP = 0.3  #: readable overlapped fraction (read fields: at most 0.16)
OVERLAP_LAYERS = 1.6  #: summed OD above this many layers of red cell: cells stacked
FIELD_PIXELS = 25_000_000  #: a single-level image this small is one camera field, read whole
ASSUMED_SMEAR_MPP = 0.1  #: level-0 µm/px assumed for a scan stating none (100× oil)
_BLOCK = 1024  #: zone pixels judged at a time (a side)


def _thumbnail_mpp(slide) -> float:
    """What :func:`~napari_hemato.core.tissue.read_thumbnail` is asked for to read ``slide``
    at :data:`ZONE_MPP` (it assumes its own level-0 pixel size for a slide stating none)."""
    return ZONE_MPP / (slide.mpp or ASSUMED_SMEAR_MPP) * (slide.mpp or ASSUMED_MPP0)


def covered_stacked(rgb: np.ndarray, glass_od: np.ndarray, layer_od: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of ``rgb`` (float 0-255): covered by red cells (summed OD against the glass
    above half a layer's) and stacked (above :data:`OVERLAP_LAYERS` layers)."""
    od = np.clip(_od(rgb) - glass_od, 0, None).sum(-1)
    return od > 0.5 * layer_od, od > OVERLAP_LAYERS * layer_od


def window_fractions(covered: np.ndarray, stacked: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                     shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, overlap)`` per window, pixel ``(i, j)`` of ``covered`` / ``stacked`` (h, w)
    falling in window ``(rows[i], cols[j])`` of a ``shape`` grid (windows without pixels: 0)."""
    idx = (rows[:, None] * shape[1] + cols[None, :]).ravel()
    n = np.maximum(np.bincount(idx, minlength=shape[0] * shape[1]).astype(np.float64), 1)
    cov = np.bincount(idx, covered.ravel().astype(np.float64), shape[0] * shape[1])
    over = np.bincount(idx, stacked.ravel().astype(np.float64), shape[0] * shape[1])
    return (cov / n).reshape(shape), (over / n).reshape(shape)


def readable(coverage: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """Windows whose red cells lie as a monolayer (module docstring, step 3)."""
    lo, hi = COVERAGE_RANGE
    zone = (coverage >= lo) & (coverage <= hi) & (overlap <= MAX_OVERLAP)
    zone = ndi.binary_opening(zone, structure=np.ones((2, 2)))  # isolated windows go
    # gaps of up to 4 windows inside the zone are filled (a white cell, a bubble)
    return _fill_small_holes(zone, 5)


def layer_density(slide, *, roi: Box | None = None) -> tuple[np.ndarray, float]:
    """The scan's glass colour (3,) and the summed optical density of one layer of its red
    cells, measured on full-resolution patches (module docstring, step 1)."""
    glass, cells = _stats(colour_sample(slide, roi=roi), DEFAULT_MIN_CELL_OD)
    return glass, (float(cells.sum()) if cells is not None else math.inf)


def detect_reading_zone(slide, *, roi: Box | None = None, field_pixels: int = FIELD_PIXELS):
    """The reading zone of a smear ``slide`` (see the module docstring) as a
    :class:`~napari_hemato.core.tissue.TissueMask` of :data:`WINDOW_UM`-µm windows, or None
    for a camera field (one pyramid level, at most ``field_pixels`` pixels: read whole). With
    ``roi`` (level-0 y0, x0, y1, x1) only that region is judged; the mask is empty
    elsewhere."""
    h0, w0 = slide.shape
    if len(slide.levels) == 1 and h0 * w0 <= field_pixels:
        return None
    mpp0 = slide.mpp or ASSUMED_SMEAR_MPP
    glass, layer = layer_density(slide, roi=roi)
    glass_od = _od(glass)
    # windows of WINDOW_UM; the scan read at ZONE_MPP in blocks of whole windows
    shape = (max(1, round(h0 * mpp0 / WINDOW_UM)), max(1, round(w0 * mpp0 / WINDOW_UM)))
    scale = (h0 / shape[0], w0 / shape[1])  # level-0 px per window
    thumb_mpp = _thumbnail_mpp(slide)
    y0, x0, y1, x1 = roi if roi is not None else (0, 0, h0, w0)
    r0, c0 = int(y0 // scale[0]), int(x0 // scale[1])
    r1, c1 = min(shape[0], math.ceil(y1 / scale[0])), min(shape[1], math.ceil(x1 / scale[1]))
    per_block = max(1, int(_BLOCK * ZONE_MPP / WINDOW_UM))
    coverage = np.zeros(shape, np.float32)
    overlap = np.ones(shape, np.float32)  # outside the region: not readable
    for r in range(r0, r1, per_block):
        for c in range(c0, c1, per_block):
            re, ce = min(r + per_block, r1), min(c + per_block, c1)
            box = (r * scale[0], c * scale[1], re * scale[0], ce * scale[1])
            rgb, (sy, sx), (tr, tc), _ = read_thumbnail(slide, thumb_mpp, box=box)
            covered, stacked = covered_stacked(rgb, glass_od, layer)
            # each zone pixel to the window its centre falls in
            rows = np.clip(((tr + np.arange(rgb.shape[0]) + 0.5) * sy // scale[0]).astype(int), r, re - 1)
            cols = np.clip(((tc + np.arange(rgb.shape[1]) + 0.5) * sx // scale[1]).astype(int), c, ce - 1)
            cov, over = window_fractions(covered, stacked, rows - r, cols - c, (re - r, ce - c))
            coverage[r:re, c:ce], overlap[r:re, c:ce] = cov, over
    zone = readable(coverage, overlap) if math.isfinite(layer) else np.zeros(shape, bool)
    mask = TissueMask(zone, scale, slide.mpp, "auto")
    log.info("%s: reading zone %.1f %% of a %s mask of %.0f-µm windows (one red-cell layer: "
             "summed OD %.2f)", slide.path, 100 * zone.mean(), zone.shape, WINDOW_UM, layer)
    return mask


def field_fractions(slide) -> tuple[float, float]:
    """``(coverage, overlap)`` of a whole image taken as one window, judged as
    :func:`detect_reading_zone` judges a scan's windows (how the limits were calibrated on
    fields people chose to read)."""
    glass, layer = layer_density(slide)
    covered, stacked = covered_stacked(read_thumbnail(slide, _thumbnail_mpp(slide))[0], _od(glass), layer)
    return float(covered.mean()), float(stacked.mean())
