"""Resample a whole image and its instance labels to another pixel size.

For the whole (small) regions that training, evaluation and the nucleus fine-tune
read: the image linearly with anti-aliasing when shrinking, the labels by nearest
neighbour. Slides are read through :mod:`napari_hemato.core.geometry` instead.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize


def to_model_grid(
    img: np.ndarray, lab: np.ndarray | None, mpp: float, target_mpp: float
):
    """Resample an image (linear, anti-aliased) and labels (nearest) to ``target_mpp``."""
    f = mpp / target_mpp
    if abs(f - 1) < 1e-3:
        return img, lab
    shape = (max(1, round(img.shape[0] * f)), max(1, round(img.shape[1] * f)))
    im = resize(img, shape, order=1, anti_aliasing=f < 1, preserve_range=True)
    im = np.clip(np.round(im), 0, 255).astype(np.uint8)
    lb = None
    if lab is not None:
        lb = resize(lab, shape, order=0, anti_aliasing=False, preserve_range=True)
        lb = lb.astype(np.int32)
    return im, lb


def labels_to_original(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of model-grid labels back to an image's own grid."""
    if labels.shape == tuple(shape):
        return labels
    return resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
