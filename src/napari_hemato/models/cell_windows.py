"""Cell windows for the WBC classifier: find the cell, cut its window, map CAMs back.

Every cell is normalised by its own size before the network sees it: a square
window of side ``diameter * context`` centred on the cell is cut out (mirrored at
the image border) and resized to the model's ``input_size``. Runtime and training
use exactly these functions (numpy, scipy and Pillow only).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 1.5
SEG_WORK_SIZE = 128  # segmentation runs with the shorter image side resized to this
FALLBACK_FRACTION = 0.45  # diameter = this * min(h, w) when segmentation fails


# -- image helpers -------------------------------------------------------------
def as_rgb8(image: np.ndarray) -> np.ndarray:
    """Any 2-D / RGB / RGBA image as a contiguous (H, W, 3) uint8 array.

    Examples
    --------
    >>> as_rgb8(np.zeros((4, 5), np.float32)).shape
    (4, 5, 3)
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with Pillow (antialiased when shrinking)."""
    from PIL import Image

    h, w = int(hw[0]), int(hw[1])
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


# -- size estimation -----------------------------------------------------------
def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def segment_center_cell(image: np.ndarray) -> tuple[float, tuple[float, float]] | None:
    """Segment the stained white cell nearest the centre of a single-cell image.

    Romanowsky-type stains (May-Grünwald-Giemsa, Wright) colour nuclei and
    white-cell cytoplasm blue-violet while red cells and background stay
    pink / cream / grey, so blue minus green separates them. The image is
    resized so its shorter side is ``SEG_WORK_SIZE`` (scale-free parameters),
    smoothed, thresholded at ``max(10, P40 + 12)`` of ``B - G``; the largest
    component reaching the central region is kept, holes are filled and thin
    attachments (touching red-cell rims) are opened away.

    Parameters
    ----------
    image : (H, W, 3) array
        RGB image with one cell near its centre.

    Returns
    -------
    (diameter_px, (cy, cx)) or None
        Equivalent diameter and centroid in the input's pixels, None when no
        plausible cell was found.

    Examples
    --------
    >>> img = np.full((100, 100, 3), (250, 225, 200), np.uint8)
    >>> yy, xx = np.mgrid[:100, :100]
    >>> img[(yy - 50) ** 2 + (xx - 50) ** 2 < 20**2] = (90, 50, 150)
    >>> d, (cy, cx) = segment_center_cell(img)
    >>> bool(38 < d < 43), round(cy), round(cx)
    (True, 50, 50)
    """
    rgb = as_rgb8(image)
    h, w = rgb.shape[:2]
    if min(h, w) < 8:
        return None
    f = SEG_WORK_SIZE / min(h, w)
    work = _resize(rgb, (max(8, round(h * f)), max(8, round(w * f)))).astype(np.float32)
    fy, fx = work.shape[0] / h, work.shape[1] / w
    wh, ww = work.shape[:2]
    m = min(wh, ww)
    work = ndi.gaussian_filter(work, (0.7, 0.7, 0))
    s = work[..., 2] - work[..., 1]
    t_low = max(10.0, float(np.percentile(s, 40)) + 12.0)
    mask = s > t_low
    mask = ndi.binary_opening(mask, _disk(1))
    mask = ndi.binary_fill_holes(ndi.binary_closing(np.pad(mask, 2), _disk(1))[2:-2, 2:-2])
    lab, n = ndi.label(mask)
    if n == 0:
        return None
    cy0, cx0 = (wh - 1) / 2, (ww - 1) / 2
    yy, xx = np.ogrid[:wh, :ww]
    central = (yy - cy0) ** 2 + (xx - cx0) ** 2 < (0.2 * m) ** 2
    near = np.unique(lab[central])
    near = near[near > 0]
    if len(near) == 0:
        return None
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    comp = lab == int(near[np.argmax(areas[near])])
    d0 = math.sqrt(4 * comp.sum() / math.pi)
    r2 = max(2, round(0.12 * d0))  # detach red-cell rims touching the cell: opening by a disc
    padded = np.pad(comp, r2 + 1)
    eroded = ndi.distance_transform_edt(padded) > r2
    opened = (ndi.distance_transform_edt(~eroded) <= r2)[r2 + 1 : -r2 - 1, r2 + 1 : -r2 - 1] & comp
    lab2, n2 = ndi.label(opened)
    if n2:
        comp = lab2 == int(np.argmax(np.bincount(lab2.ravel())[1:])) + 1
    area = float(comp.sum())
    if area < 12 or area > 0.8 * wh * ww:
        return None
    ys, xs = np.nonzero(comp)
    diameter = math.sqrt(4 * area / math.pi) / math.sqrt(fy * fx)
    cy, cx = (ys.mean() + 0.5) / fy - 0.5, (xs.mean() + 0.5) / fx - 0.5
    return float(diameter), (float(cy), float(cx))


def estimate_cell_diameter(image: np.ndarray) -> float:
    """Equivalent diameter (px) of the white cell near the centre of ``image``.

    Uses :func:`segment_center_cell`; when that fails, falls back to
    ``0.45 * min(h, w)`` (a cell filling a typical single-cell image) and logs
    a warning. Scale-free: a 2x upscaled image gives a 2x larger diameter.

    Parameters
    ----------
    image : (H, W, 3) array
        Single-cell RGB image, any size or magnification.

    Returns
    -------
    float
        Diameter in pixels of ``image``.

    Examples
    --------
    >>> img = np.full((100, 100, 3), (250, 225, 200), np.uint8)
    >>> yy, xx = np.mgrid[:100, :100]
    >>> img[(yy - 50) ** 2 + (xx - 50) ** 2 < 20**2] = (90, 50, 150)
    >>> bool(38 < estimate_cell_diameter(img) < 43)
    True
    >>> round(estimate_cell_diameter(np.full((100, 80, 3), 255, np.uint8)))  # fallback
    36
    """
    found = segment_center_cell(image)
    if found is None:
        h, w = np.asarray(image).shape[:2]
        d = FALLBACK_FRACTION * min(h, w)
        log.warning("no cell segmented in a %dx%d image; assuming diameter %.0f px", h, w, d)
        return float(d)
    return found[0]


# -- size normalisation --------------------------------------------------------
def cell_window(center_yx, diameter_px: float, context: float = DEFAULT_CONTEXT, *,
                side_px: float | None = None) -> tuple[int, int, int]:
    """Integer square window ``(y0, x0, side)`` of side ``diameter * context`` around a centre.

    ``center_yx`` is in pixel-index coordinates (the centre of an
    ``h x w`` crop is ``((h - 1) / 2, (w - 1) / 2)``). A given ``side_px``
    (a physical window, :mod:`napari_hemato.models.window_scale`) replaces
    ``diameter * context``.

    Examples
    --------
    >>> cell_window((89.5, 90.5), 80.0, 1.5)
    (30, 31, 120)
    """
    side = float(diameter_px) * float(context) if side_px is None else float(side_px)
    side = max(4, int(round(side)))
    y0 = int(round(float(center_yx[0]) - (side - 1) / 2))
    x0 = int(round(float(center_yx[1]) - (side - 1) / 2))
    return y0, x0, side


def extract_window(image: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    """The ``side x side`` window at (y0, x0), mirrored where it leaves the image.

    Only the part of ``image`` under the window is read, so this is cheap on
    large fields. Mirroring (``numpy.pad(mode="symmetric")``) keeps the
    background's colour and texture instead of smearing edge pixels.

    Examples
    --------
    >>> extract_window(np.arange(16, dtype=np.uint8).reshape(4, 4), -1, 0, 3)[:, 0]
    array([0, 0, 4], dtype=uint8)
    """
    h, w = image.shape[:2]
    ya, yb = min(max(y0, 0), h - 1), min(max(y0 + side, 1), h)
    xa, xb = min(max(x0, 0), w - 1), min(max(x0 + side, 1), w)
    yb, xb = max(yb, ya + 1), max(xb, xa + 1)
    part = image[ya:yb, xa:xb]
    pads = [(ya - y0, y0 + side - yb), (xa - x0, x0 + side - xb)]
    if any(p < 0 for pp in pads for p in pp):  # window entirely outside: use the nearest pixels
        pads = [(max(0, a), max(0, b)) for a, b in pads]
    pads += [(0, 0)] * (image.ndim - 2)
    if any(p for pp in pads for p in pp):
        part = np.pad(part, pads, mode="symmetric")
    return part[:side, :side]


def normalize_cell(
    image: np.ndarray, center_yx, diameter_px: float, *, context: float = DEFAULT_CONTEXT, size: int = 128,
    side_px: float | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Size-normalised input for the classifier: window around the cell resized to ``size``.

    Parameters
    ----------
    image : (H, W, 3) uint8
        Image holding the cell (a crop, a smear field or a slide region).
    center_yx : (float, float)
        Cell centre in pixel-index coordinates.
    diameter_px : float
        Cell diameter in pixels of ``image``.
    context : float
        Window side / cell diameter.
    size : int
        Output side (the model's ``input_size``).
    side_px : float, optional
        Window side in px; replaces ``diameter_px * context`` (red-cell scale).

    Returns
    -------
    crop : (size, size, 3) uint8
    window : (y0, x0, side)
        Where the window lies in ``image``.

    Examples
    --------
    >>> x, win = normalize_cell(np.zeros((180, 182, 3), np.uint8), (89.5, 90.5), 80, size=64)
    >>> x.shape, win
    ((64, 64, 3), (30, 31, 120))
    """
    y0, x0, side = cell_window(center_yx, diameter_px, context, side_px=side_px)
    win = extract_window(image, y0, x0, side)
    return _resize(win, (size, size)), (y0, x0, side)


def _interp_matrix(pos: np.ndarray, side: int, n: int) -> np.ndarray:
    """(len(pos), n) bilinear weights sampling an n-cell grid spread over ``side`` pixels.

    Rows of positions outside ``[0, side)`` are zero (outside the window).
    """
    u = np.clip((pos + 0.5) / side * n - 0.5, 0, n - 1)
    i0 = np.floor(u).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    frac = (u - i0).astype(np.float32)
    m = np.zeros((len(pos), n), np.float32)
    rows = np.arange(len(pos))
    m[rows, i0] += 1 - frac
    m[rows, i1] += frac
    m[(pos < 0) | (pos >= side)] = 0
    return m


def cam_to_crop(cam: np.ndarray, window: tuple[int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """Map a low-resolution CAM of the normalised window back onto a crop of ``shape``.

    The CAM is clipped at 0, scaled to a maximum of 1, bilinearly sampled at
    every crop pixel inside the window and 0 outside it.

    Examples
    --------
    >>> cam_to_crop(np.ones((4, 4)), (0, 0, 8), (10, 10))[[0, 9], [0, 9]]
    array([1., 0.], dtype=float32)
    """
    cam = np.maximum(np.asarray(cam, np.float32), 0.0)
    top = float(cam.max()) if cam.size else 0.0
    h, w = int(shape[0]), int(shape[1])
    if top <= 0:
        return np.zeros((h, w), np.float32)
    cam = cam / top
    y0, x0, side = window
    ry = _interp_matrix(np.arange(h) - y0, side, cam.shape[0])
    rx = _interp_matrix(np.arange(w) - x0, side, cam.shape[1])
    out = ry @ cam @ rx.T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# -- the classifier ------------------------------------------------------------
