"""Colour standardisation of cell windows (runtime and training use the same code).

Two things differ most between laboratories' blood-smear images, more than
any stain shade: the **background colour** (CellaVision PBC images are cream,
BCCD fields are grey-cyan at ~210 grey) and the **stain density** (the darkest
1 % of a PBC cell window has a summed optical density of ~4.2, a BCCD window
~1.1). A classifier trained on one lab learns both as features.

:func:`standardize_colour` removes both from each size-normalised window:

1. the background colour is the mean colour of the window's brightest 10 %
   of pixels (gaps between red cells); every channel is divided by it, so the
   background becomes white (optical density 0);
2. the optical densities are scaled so that the 99th percentile of the summed
   density is :data:`TARGET_OD` (the factor is clipped to
   :data:`SCALE_LIMITS`, so a window with almost no stain is not blown up).

Hue and relative densities (granules vs nucleus vs cytoplasm) are kept, so the
cues a haematologist uses stay; the remaining shade differences are left to
training-time stain augmentation. A classifier's spec selects it with
``preprocess["colour"] = "od-standardize"``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

COLOUR_MODES = ("none", "od-standardize")
TARGET_OD = 3.0
SCALE_LIMITS = (0.33, 4.0)
BACKGROUND_FRACTION = 0.10


def standardize_colour(batch: np.ndarray) -> np.ndarray:
    """White background and a fixed stain density for each window of a uint8 batch.

    Parameters
    ----------
    batch : (N, H, W, 3) or (H, W, 3) uint8
        Size-normalised cell windows.

    Returns
    -------
    Same shape, uint8.

    Examples
    --------
    >>> win = np.full((8, 8, 3), (210, 212, 205), np.uint8)  # grey-cyan background
    >>> win[2:6, 2:6] = (150, 120, 190)  # a pale violet cell
    >>> out = standardize_colour(win)
    >>> out[0, 0].tolist(), out[3, 3].tolist()  # white background, denser violet
    ([255, 255, 255], [91, 45, 202])
    """
    x = np.asarray(batch)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) windows, got shape {np.asarray(batch).shape}")
    n = x.shape[0]
    f = np.maximum(x.reshape(n, -1, 3).astype(np.float32), 1.0)
    brightness = f.sum(-1)
    k = max(1, int(round(BACKGROUND_FRACTION * brightness.shape[1])))
    top = np.argpartition(-brightness, k - 1, axis=1)[:, :k]
    background = np.take_along_axis(f, top[..., None], axis=1).mean(1, keepdims=True)
    od = np.maximum(np.log(background) - np.log(f), 0.0)
    total = od.sum(-1)
    p99 = np.percentile(total, 99, axis=1)
    scale = np.clip(TARGET_OD / np.maximum(p99, 1e-3), *SCALE_LIMITS).astype(np.float32)
    out = 255.0 * np.exp(-od * scale[:, None, None])
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(x.shape)
    return out[0] if single else out


def apply_colour_mode(batch: np.ndarray, mode: str | None) -> np.ndarray:
    """``batch`` standardised as ``mode`` says (None / "none": unchanged)."""
    if mode in (None, "none"):
        return batch
    if mode == "od-standardize":
        return _on_two_threads(standardize_colour, batch)
    raise ValueError(f"unknown colour mode {mode!r} (known: {', '.join(COLOUR_MODES)})")


def _on_two_threads(fn, batch: np.ndarray) -> np.ndarray:
    """``fn`` of a batch of windows, each half on its own thread (numpy releases the GIL;
    every window is standardised on its own, so the result is the same)."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or len(batch) < 8 or (os.cpu_count() or 1) < 2:
        return fn(batch)
    half = len(batch) // 2
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(fn, (batch[:half], batch[half:]))
    return np.concatenate([first, second])
