"""A ruler for single-cell crops and smear regions: the red cells around the white cell.

Red cells are 7-8 µm across in every normal smear, so their diameter in pixels
gives the pixel size of an image that states none (:data:`RBC_UM` / diameter).
:func:`estimate_red_cell_diameter` finds them by colour and shape, Qt- and
torch-free (numpy, scipy, scikit-image through :mod:`napari_hemato.core.postprocess`):

1. the background colour (mean of the brightest 10 % of pixels) is divided out
   and optical densities taken, so the stain and the camera's white balance
   matter less;
2. *white-cell*
   pixels have a blue excess (``b - g`` of the background-normalised image) above
   0.2 or a summed density above 0.9 (nuclei, granules, basophil and lymphocyte
   cytoplasm); *stained* pixels have a summed density above ``max(0.12, Otsu)``
   (Otsu over the other pixels); the red-cell mask is stained minus white-cell pixels (dilated),
   its holes filled where faintly stained (central pallor: mean density at least
   :data:`PALLOR_OD` of the threshold; the background gaps between packed cells stay
   open), smoothed;
3. the distance transform's h-maxima (as :mod:`napari_hemato.core.smear_scale`)
   give one marker per cell, so touching cells count once each; a marker's
   inscribed diameter is twice its distance value (the image border does not
   count as an edge). Markers of cells less than about half inside the image
   (centre within a quarter radius of the border) or whose centre lies in a disc given in ``exclude``
   (the central white cell, widened by the marker's radius) are dropped, as are specks
   and fragments (below :data:`FRAGMENT` of the 90th percentile);
4. the estimate is the median diameter of the kept cells; it is ``ok`` when at
   least :data:`MIN_CELLS` cells were kept and their quartile spread is below
   :data:`MAX_SPREAD` of the median.

The inscribed diameter of overlapping or oval cells is smaller than their
length, so the estimate reads a little short of the true mean diameter; it is
the same on every image, and :data:`RBC_UM` is the nominal diameter.

Examples
--------
>>> est = estimate_red_cell_diameter(crop)  # doctest: +SKIP
>>> est.ok, est.diameter_px, est.n_cells  # doctest: +SKIP
(True, 41.3, 9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: nominal red-cell diameter (µm) used to turn the ruler into a pixel size
RBC_UM = 7.5
#: fewer red cells than this and the estimate is not trusted
MIN_CELLS = 3
#: largest (q75 - q25) / median of the kept diameters for a trusted estimate
MAX_SPREAD = 0.45
#: longest image side measured (px); larger images are measured at this size
WORK_MAX = 640
#: with the central cell's diameter given (``cell_px``), images are measured where it is this
#: many px across: red cells stay ~20 px, and a 180 px PBC crop is read 3x faster with the
#: same readings (median ratio 0.999, quartiles 0.98-1.01 on 297 PBC validation crops)
WORK_CELL_PX = 40.0
#: kept diameters below this fraction of their 90th percentile are fragments, not cells
FRAGMENT = 0.6
#: a hole in the red-cell mask is a central pallor (filled) when its mean density is this x the threshold
PALLOR_OD = 0.3
#: smallest inscribed diameter (px of the work image) a red cell may have
MIN_DIAMETER_WORK = 8.0


@dataclass(frozen=True)
class RulerEstimate:
    """Result of :func:`estimate_red_cell_diameter` (diameters in px of the input image)."""

    diameter_px: float | None  # median red-cell diameter; None when nothing was measured
    n_cells: int  # red cells kept
    spread: float  # (q75 - q25) / median of the kept diameters (nan when none)
    ok: bool  # enough cells and a tight spread: trust it

    def mpp(self, rbc_um: float = RBC_UM) -> float | None:
        """µm/px implied by a red cell of ``rbc_um``; None when not ``ok``."""
        return float(rbc_um / self.diameter_px) if self.ok and self.diameter_px else None


def _background_normalised(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` / background colour (mean of the brightest 10 %), float32 in (0, ~1]."""
    f = rgb.astype(np.float32) + 1.0
    bright = f.sum(2)
    top = bright >= np.percentile(bright, 90)
    bg = f[top].mean(0)
    return np.clip(f / bg, 1e-3, 1.5)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values)) if values.size and np.ptp(values) > 0 else float("inf")


def red_cell_mask(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(red_cells, white_cells)`` boolean masks of an RGB image (see module docstring)."""
    from napari_hemato.models.cell_windows import as_rgb8

    n = _background_normalised(ndi.gaussian_filter(as_rgb8(image).astype(np.float32), (1, 1, 0)))
    od = -np.log10(n)
    od_sum = od.sum(2)
    blue_excess = n[..., 2] - n[..., 1]
    white = (blue_excess > 0.2) | (od_sum > 0.9)
    white = ndi.binary_opening(white, iterations=1)
    white = ndi.binary_dilation(white, iterations=2)
    t = max(0.12, _otsu(od_sum[::2, ::2][~white[::2, ::2]]))
    red = (od_sum > t) & ~white
    # fill central pallor (faintly stained) but not the background gaps between packed cells
    holes, n = ndi.label(ndi.binary_fill_holes(red) & ~red & ~white)
    if n:
        faint = np.asarray(ndi.mean(od_sum, holes, np.arange(1, n + 1))) >= PALLOR_OD * t
        red |= np.concatenate([[False], faint])[holes]
    red = ndi.binary_opening(red, iterations=2)
    return red, white


def estimate_red_cell_diameter(image: np.ndarray, *, exclude=None, cell_px: float | None = None) -> RulerEstimate:
    """Typical red-cell diameter (px) in a single-cell crop or a smear region.

    Parameters
    ----------
    image : (H, W, 3) array
        RGB image (Romanowsky-type stain), any magnification.
    exclude : sequence of (cy, cx, diameter), optional
        Discs (px of ``image``) to leave out, e.g. the white cell being
        classified; its colour usually excludes it anyway.
    cell_px : float, optional
        Diameter (px) of the white cell the image is centred on: the image is then
        measured at :data:`WORK_CELL_PX` / ``cell_px`` of its size (never enlarged).

    Returns
    -------
    RulerEstimate
        ``diameter_px`` in pixels of ``image``; ``ok`` False when fewer than
        :data:`MIN_CELLS` cells were kept or their sizes disagree.

    Examples
    --------
    >>> img = np.full((200, 200, 3), (250, 228, 200), np.uint8)
    >>> yy, xx = np.mgrid[:200, :200]
    >>> for cy, cx in [(40, 40), (40, 120), (120, 40), (150, 150), (110, 100)]:
    ...     img[(yy - cy) ** 2 + (xx - cx) ** 2 < 15**2] = (200, 150, 160)
    >>> est = estimate_red_cell_diameter(img)
    >>> est.ok, est.n_cells, bool(27 < est.diameter_px < 32)
    (True, 5, True)
    """
    from napari_hemato.core.postprocess import _h_maxima_markers
    from napari_hemato.models.cell_windows import _resize, as_rgb8

    rgb = as_rgb8(image)
    h, w = rgb.shape[:2]
    f = min(1.0, WORK_MAX / max(h, w))
    if cell_px is not None and np.isfinite(cell_px) and cell_px > 0:
        f = min(f, WORK_CELL_PX / float(cell_px))
    if f < 1.0:
        rgb = _resize(rgb, (max(8, round(h * f)), max(8, round(w * f))))
    f = math.sqrt(rgb.shape[0] / h * rgb.shape[1] / w)
    red, _ = red_cell_mask(rgb)
    if not red.any():
        return RulerEstimate(None, 0, float("nan"), False)
    edt = ndi.distance_transform_edt(np.pad(red, 1, constant_values=True))[1:-1, 1:-1] * red
    markers = _h_maxima_markers(edt, 1.5, red, red & (edt > 1.0))
    n = int(markers.max())
    if n == 0:
        return RulerEstimate(None, 0, float("nan"), False)
    idx = np.arange(1, n + 1)
    cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(markers > 0, markers, idx), strict=True))
    r = np.asarray(ndi.maximum(edt, markers, idx), float)
    wh, ww = red.shape
    # the border does not cut the distance map: a cell more than half inside keeps its true
    # inscribed radius with its centre inside; a smaller part peaks on the border row itself
    margin = np.maximum(2.0, 0.25 * r)
    keep = ((r * 2 >= MIN_DIAMETER_WORK) & (cy >= margin) & (cx >= margin)
            & (cy <= wh - 1 - margin) & (cx <= ww - 1 - margin))
    for ey, ex, ed in exclude or ():
        keep &= np.hypot(cy - ey * f, cx - ex * f) >= ed * f / 2 + 0.5 * r
    d = 2 * r[keep] / f
    if len(d) == 0:
        return RulerEstimate(None, 0, float("nan"), False)
    d = d[d >= FRAGMENT * np.percentile(d, 90)]  # fragments: pieces left between cells, cut cells
    med = float(np.median(d))
    q25, q75 = np.percentile(d, [25, 75])
    spread = float((q75 - q25) / med)
    return RulerEstimate(med, int(len(d)), spread, bool(len(d) >= MIN_CELLS and spread <= MAX_SPREAD))


__all__ = ["MIN_CELLS", "RBC_UM", "RulerEstimate", "estimate_red_cell_diameter", "red_cell_mask"]
