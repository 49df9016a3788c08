"""Colour match: an image's glass and stain brought to those of a model's training images.

Labs differ in the colour of the glass (light source, white balance, camera) and in how
densely and in what hue the stain takes, more than a model trained on one lab's images has
seen. :func:`match_colour` removes the two first-order differences from each image before
the network, in optical density (OD = −log(I / 256)), where a stain's amount is a scale:

1. the **glass**: the mean colour of the image's brightest :data:`GLASS_FRACTION` of pixels
   (pure-white padding excluded) is taken as its background; every pixel's OD is measured
   against it, so the glass has OD 0;
2. the **stain**: each channel's median OD over the stained pixels (summed OD above
   ``min_cell_od``: cells) is scaled to the training images' (the factor clipped to
   ``scale_limits``; with fewer than :data:`MIN_CELL_FRACTION` stained pixels, no scaling);
3. the training images' glass colour is put back.

On the training images themselves this is nearly the identity (their glass and stain vary
little around the medians measured on them). Hue differences that are not a per-channel
scale remain (stain augmentation in training covers part of them). A model's spec selects it
with ``preprocess["colour_match"] = {"glass": [r, g, b], "cell_od": [r, g, b],
"min_cell_od": ..., "scale_limits": [lo, hi]}`` (:meth:`napari_hemato.core.spec.ModelSpec.normalize`
applies it per image, so the engine, the fine-tunes and the benchmarks all see the same
input); :func:`measure_colour` gives those numbers from training images. The statistics come
from histograms and the change is one 256-entry table per channel: about 3 ms for a smear
field's padded tile on one core.

**Once per image.** Measured on each tile, the match would differ from tile to tile of one
scan (a thick edge and the monolayer beside it), and between the red-cell ruler's probes of one
field (each resampled differently). :func:`for_image` measures the image (or its region) once,
from a sample of its pixels (:func:`colour_sample`), and returns the predictor with those
numbers fixed in its spec (``image_glass``, ``image_cell_od``): every tile and probe of that
image then gets the same tables, and the run's config records what was measured.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

GLASS_FRACTION = 0.10  # the brightest pixels taken as glass
MIN_CELL_FRACTION = 0.02  # fewer stained pixels than this: the stain is not rescaled
DEFAULT_MIN_CELL_OD = 0.3
DEFAULT_SCALE_LIMITS = (0.33, 3.0)
#: most pixels :func:`colour_sample` reads (a 640 x 480 field is read whole)
SAMPLE_PIXELS = 4_000_000
#: side of the patches a larger image is sampled in
SAMPLE_PATCH = 512
#: pixels the colour is measured on: every k-th row and column of a larger sample
MEASURE_PIXELS = 100_000


def _od(x: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(x, np.float32) + 1.0) / 256.0)


#: the optical density of each uint8 value (the per-pixel work is table look-ups)
_OD_TABLE = _od(np.arange(256))


def _median_od(values: np.ndarray) -> float:
    """``np.median`` of the optical densities of uint8 ``values`` (od is monotonic: the middle
    value's, or the mean of the two middle values' for an even count), from a histogram."""
    counts = np.cumsum(np.bincount(values, minlength=256))
    n = int(counts[-1])
    lo, hi = np.searchsorted(counts, [(n - 1) // 2, n // 2], side="right")
    return float((_OD_TABLE[lo] + _OD_TABLE[hi]) / 2)


def _stats(image: np.ndarray, min_cell_od: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``(glass colour (3,), median cell OD against the glass (3,) or None)`` of an RGB uint8 image."""
    rgb = np.asarray(image)[..., :3]
    chans = [np.ascontiguousarray(rgb[..., c]).ravel() for c in range(3)]
    total = chans[0].astype(np.int32) + chans[1] + chans[2]
    real = total < 765  # the engine's white padding is no glass of this image
    n_real = int(real.sum())
    if n_real < 16:
        return np.full(3, 255.0, np.float32), None
    # the brightest GLASS_FRACTION: np.quantile's (linear) cut, from the histogram of the sums
    hist = np.bincount(total[real], minlength=766)
    order = np.cumsum(hist)
    pos = (n_real - 1) * (1 - GLASS_FRACTION)
    below, above = np.searchsorted(order, [int(np.floor(pos)), int(np.ceil(pos))], side="right")
    cut = below + (above - below) * (pos - np.floor(pos))
    bright = real & (total >= cut)
    glass = np.array([c[bright].mean() for c in chans], np.float32)
    glass_od = _od(glass)
    od_sum = _OD_TABLE[chans[0]] + _OD_TABLE[chans[1]] + _OD_TABLE[chans[2]]
    stained = real & (od_sum - glass_od.sum() > min_cell_od)
    if stained.sum() < MIN_CELL_FRACTION * n_real:
        return glass, None
    return glass, np.array([_median_od(c[stained]) for c in chans], np.float32) - glass_od


def measure_colour(images, *, min_cell_od: float = DEFAULT_MIN_CELL_OD) -> dict:
    """The ``colour_match`` parameters of a set of training images: the median glass colour and
    the median of each image's median cell OD."""
    glasses, cells = [], []
    for image in images:
        glass, cell = _stats(image, min_cell_od)
        glasses.append(glass)
        if cell is not None:
            cells.append(cell)
    if not cells:
        raise ValueError("no stained pixels in the images: no colour to match")
    glasses, cells = np.asarray(glasses), np.asarray(cells)
    # the training images' own spread: the 5th-95th percentile of each channel around the median
    stain_spread = np.quantile(cells / np.median(cells, 0), [0.05, 0.95], axis=0)
    glass_spread = np.abs(_od(glasses) - _od(np.median(glasses, 0))).max(1)
    return {"glass": np.median(glasses, 0).astype(float).round(1).tolist(),
            "cell_od": np.median(cells, 0).astype(float).round(4).tolist(),
            "min_cell_od": min_cell_od, "scale_limits": list(DEFAULT_SCALE_LIMITS),
            "stain_tolerance": round(float(max(stain_spread[1].max(), 1 / stain_spread[0].min())), 3),
            "glass_tolerance_od": round(float(np.quantile(glass_spread, 0.95)), 3)}


def match_colour(image: np.ndarray, params: dict) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the glass and stain of the images ``params`` were measured on.

    Within the training images' own spread nothing changes: a channel's stain is rescaled only
    by what its ratio to the training median exceeds ``stain_tolerance`` by, the glass replaced
    only when a channel's OD differs by more than ``glass_tolerance_od``; an image inside both
    comes back as it is.

    Examples
    --------
    >>> field = np.full((40, 40, 3), (230, 220, 240), np.uint8)  # violet-tinted glass
    >>> field[10:30, 10:30] = (150, 60, 170)  # densely stained cells
    >>> params = {"glass": [207, 208, 203], "cell_od": [0.15, 0.3, 0.2], "stain_tolerance": 1.2,
    ...           "glass_tolerance_od": 0.03}
    >>> out = match_colour(field, params)
    >>> out[0, 0].tolist(), out[20, 20].tolist()  # the training glass, lighter cells
    ([207, 208, 203], [173, 136, 159])
    >>> like = np.full((40, 40, 3), (207, 208, 203), np.uint8)  # the training glass ...
    >>> like[10:30, 10:30] = (178, 154, 166)  # ... and stain
    >>> bool((match_colour(like, params) == like).all())  # untouched
    True
    """
    rgb = np.asarray(image)[..., :3]
    min_cell_od = float(params.get("min_cell_od", DEFAULT_MIN_CELL_OD))
    lo, hi = params.get("scale_limits", DEFAULT_SCALE_LIMITS)
    tol = float(params.get("stain_tolerance", 1.0))
    if "image_glass" in params:  # measured once on the whole image (:func:`for_image`)
        glass = np.asarray(params["image_glass"], np.float32)
        cells = params.get("image_cell_od")
        cells = None if cells is None else np.asarray(cells, np.float32)
    else:
        glass, cells = _stats(rgb, min_cell_od)
    scale = np.ones(3, np.float32)
    if cells is not None:
        ratio = np.asarray(params["cell_od"], np.float32) / np.maximum(cells, 1e-3)
        scale = np.where(ratio > tol, ratio / tol, np.where(ratio < 1 / tol, ratio * tol, 1.0))
        scale = np.clip(scale, lo, hi).astype(np.float32)
    target = np.asarray(params["glass"], np.float32)
    if np.abs(_od(glass) - _od(target)).max() <= float(params.get("glass_tolerance_od", 0.0)):
        target = glass  # the image's own glass is within the training images' spread
    if (scale == 1).all() and (target == glass).all():
        return rgb
    # each channel is a function of its own uint8 value: one 256-entry table per channel
    od = _OD_TABLE[None, :] - _od(glass)[:, None]
    tables = np.exp(-(od * scale[:, None] + _od(target)[:, None])) * 256.0 - 1.0
    tables = np.clip(np.round(tables), 0, 255).astype(np.uint8)
    out = np.stack([tables[c][rgb[..., c]] for c in range(3)], axis=-1)
    out[(rgb == 255).all(-1)] = 255  # the padding stays the padding the model was trained with
    return out


def measure_image(image: np.ndarray, params: dict) -> dict:
    """The glass colour and median cell OD of ``image`` (RGB uint8, any leading shape), as the
    ``image_glass`` / ``image_cell_od`` entries :func:`match_colour` then uses instead of
    measuring each image it is given (``image_cell_od`` None: too few stained pixels)."""
    image = np.asarray(image)
    n = image.size // image.shape[-1]
    k = max(1, int(np.ceil(np.sqrt(n / MEASURE_PIXELS))))  # a regular subsample: the same medians
    glass, cells = _stats(image[..., ::k, ::k, :], float(params.get("min_cell_od", DEFAULT_MIN_CELL_OD)))
    return {"image_glass": [round(float(v), 3) for v in glass],
            "image_cell_od": None if cells is None else [round(float(v), 5) for v in cells]}


def colour_sample(slide, *, roi=None, mpp: float | None = None,
                  max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
    """Pixels of ``slide`` (level-0 box ``roi``, default all of it) to measure its colour on,
    as RGB uint8 ``(n, h, w, 3)``.

    Read from the coarsest level not coarser than ``mpp`` (the model's pixel size; level 0
    when None or unknown): the whole region when it has at most ``max_pixels`` pixels there,
    else a grid of :data:`SAMPLE_PATCH`-pixel patches evenly spread over it, ``max_pixels``
    in all. A smear field is read whole.
    """
    from napari_hemato.core.slide import to_rgb8

    level = slide.best_level(mpp) if mpp else 0
    down = slide.downsamples[level]
    h0, w0 = slide.shape
    y0, x0, y1, x1 = roi if roi is not None else (0, 0, h0, w0)
    ly0, lx0 = int(y0 / down), int(x0 / down)
    ly1, lx1 = max(ly0 + 1, int(np.ceil(y1 / down))), max(lx0 + 1, int(np.ceil(x1 / down)))
    h, w = ly1 - ly0, lx1 - lx0
    if h * w <= max_pixels:
        return to_rgb8(slide.read_region(level, ly0, lx0, ly1, lx1))[None]
    side = min(SAMPLE_PATCH, h, w)
    k = max(1, int(max_pixels // side**2))
    rows = max(1, min(int(np.sqrt(k * h / w) + 0.5), k, (h + side - 1) // side))
    cols = max(1, min(k // rows, (w + side - 1) // side))
    ys = np.linspace(ly0, ly1 - side, rows).astype(int)
    xs = np.linspace(lx0, lx1 - side, cols).astype(int)
    return np.stack([to_rgb8(slide.read_region(level, y, x, y + side, x + side))
                     for y in ys for x in xs])


def for_image(predictor, slide, *, roi=None):
    """``predictor`` with its colour match fixed to ``slide``'s colour (region ``roi``),
    measured once on :func:`colour_sample` (module docstring); ``predictor`` itself when
    its model matches no colours. The copy shares the network (a shallow copy with another
    spec)."""
    params = predictor.spec.preprocess.get("colour_match")
    if not params:
        return predictor
    base = {k: v for k, v in params.items() if k not in ("image_glass", "image_cell_od")}
    sample = colour_sample(slide, roi=roi, mpp=predictor.spec.mpp)
    fixed = replace(predictor.spec, preprocess={**predictor.spec.preprocess,
                                                "colour_match": {**base, **measure_image(sample, base)}})
    # not copy.copy: it goes through a predictor's pickling state, whose __setstate__ runs the
    # constructor again (weights checked, session looked up); this copy only swaps the spec
    out = object.__new__(type(predictor))
    out.__dict__.update(vars(predictor))
    out.spec = fixed
    return out
