"""Training batches of the mitosis detector (torch; ``train`` extra).

See :mod:`napari_hemato.train.mitosis` for what the windows hold; the
normalisation is the network's (``normalization``, as in its spec).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from napari_hemato.train import data_mitosis as dm
from napari_hemato.train.augment import ColorAugment
from napari_hemato.train.common import normalize
from napari_hemato.train.nets import IMAGENET_NORMALIZATION

SIGMA_UM, IGNORE_UM, MARGIN_UM = 1.75, 10.0, 2.0
WINDOW_UM = (16.0, 20.0, 24.0)


class Sampler:
    """Draws augmented training batches (see the module docstring)."""

    def __init__(self, crops: dm.Crops, tissue: list[dm.TissueRegion], mpp: float, divisor: int,
                 *, p_surround: float = 0.125, p_tissue: float = 0.375, compose: int = 1,
                 normalization=IMAGENET_NORMALIZATION, color: dict | None = None) -> None:
        self.crops, self.tissue, self.mpp = crops, [t.image for t in tissue], mpp
        self.compose = int(compose)
        if self.compose > 1:  # canvases of compose x compose windows of the largest size
            unit = max(8, int(round(max(WINDOW_UM) / mpp / 8)) * 8)
            if (unit * self.compose) % divisor:
                raise ValueError(f"{self.compose} x {unit} px canvases are not multiples of {divisor}")
            self.sizes = [unit]
        else:
            self.sizes = sorted({max(divisor, int(round(u / mpp / divisor)) * divisor)
                                 for u in WINDOW_UM})
        self.p_surround = p_surround
        self.p_tissue = p_tissue if self.tissue else 0.0
        self.tissue_p = tissue_weights(tissue) if self.tissue else None
        self.hard: list[tuple[int, float, float]] = []
        self.color = ColorAugment(p_jpeg=0.5, jpeg_quality=(50, 95), p_blur=0.3,
                                  blur_sigma=(0.3, 1.5), **(color or {}))
        self.sigma = SIGMA_UM / mpp
        self.normalization = normalization

    def batch(self, n: int, rng: np.random.Generator):
        """``n`` inputs: windows, or (``compose`` > 1) canvases of compose² windows.

        A canvas tiles independently drawn windows (positives with the figure
        anywhere, crop surroundings, tissue), so the network trains on inputs
        large enough for its receptive field while every figure still sits at
        a random place relative to the window seams.
        """
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        k = self.compose
        items = []
        for _ in range(n * k * k):
            u = rng.random()
            if u < self.p_tissue:
                items.append(self._tissue(size, rng))
            elif u < self.p_tissue + self.p_surround:
                items.append(self._crop(size, rng, surround=True))
            else:
                items.append(self._crop(size, rng, surround=False))
        img = torch.stack([i[0] for i in items])
        heat, mask, cls = (torch.stack([torch.from_numpy(i[j]) for i in items]) for j in (1, 2, 3))
        if k > 1:
            img, heat, mask, cls = (_tile(a, n, k) for a in (img, heat, mask, cls))
        img = _degrade(img, rng)
        img = self.color(img, rng)
        return normalize(img, self.normalization), heat[:, None], mask[:, None], cls

    def _window(self, img, y0, x0, win, size, rng, point=None):
        t = torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + win, x0 : x0 + win]))
        t = t.permute(2, 0, 1).float()
        if win != size:
            t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=win > size)[0]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        t = torch.rot90(t, k, dims=(1, 2))
        if flip:
            t = torch.flip(t, dims=(2,))
        if point is not None:
            f = size / win
            y, x = (point[0] - y0 + 0.5) * f - 0.5, (point[1] - x0 + 0.5) * f - 0.5
            for _ in range(k):  # rot90 (counter-clockwise): (y, x) -> (size-1-x, y)
                y, x = size - 1 - x, y
            if flip:
                x = size - 1 - x
            point = (y, x)
        return t.contiguous(), point

    def _scale_win(self, size, rng, limit):
        s = math.exp(rng.uniform(math.log(0.85), math.log(1.15)))
        return int(min(limit, max(8, round(size / s))))

    def _crop(self, size, rng, surround):
        i = int(rng.integers(len(self.crops)))
        img = self.crops.images[i]
        h = img.shape[0]
        cy, cx = self.crops.centres[i]
        win = self._scale_win(size, rng, h)
        margin = MARGIN_UM / self.mpp * win / size
        if surround:  # the figure within 2 µm of the window's border (or on it)
            y0, x0 = self._edge_origin(cy, cx, win, h, margin, rng)
            surround = y0 is not None
        if not surround:
            y0 = self._origin(cy, win, h, margin, rng)
            x0 = self._origin(cx, win, h, margin, rng)
        t, (py, px) = self._window(img, y0, x0, win, size, rng, point=(cy, cx))
        d2 = _dist2(size, py, px)
        if surround:
            heat = np.zeros((size, size), np.float32)
            mask = (d2 > (IGNORE_UM / self.mpp) ** 2).astype(np.float32)
            cls = np.full((size, size), -1, np.int64)
        else:
            heat = np.exp(-d2 / (2 * self.sigma**2)).astype(np.float32)
            mask = np.ones((size, size), np.float32)
            cls = np.where(heat > 0.1, int(self.crops.labels[i]), -1).astype(np.int64)
        return t, heat, mask, cls

    @staticmethod
    def _origin(c, win, h, margin, rng) -> int:
        lo, hi = max(0.0, c - win + 1 + margin), min(h - win, c - margin)
        if hi <= lo:
            return int(np.clip(round(c - win / 2), 0, h - win))
        return int(np.clip(np.floor(rng.uniform(lo, hi + 1)), 0, h - win))

    @staticmethod
    def _edge_origin(cy, cx, win, h, margin, rng):
        origins = np.arange(h - win + 1)
        cands = []
        for axis, c in ((0, cy), (1, cx)):
            p = c - origins
            near = origins[(p <= margin) | (p >= win - 1 - margin)]
            cands += [(axis, int(v)) for v in near]
        if not cands:
            return None, None
        axis, v = cands[int(rng.integers(len(cands)))]
        other = int(rng.integers(0, h - win + 1))
        return (v, other) if axis == 0 else (other, v)

    def _tissue(self, size, rng):
        hard = self.hard and rng.random() < 0.5
        if hard:
            r, y, x = self.hard[int(rng.integers(len(self.hard)))]
            img = self.tissue[r]
        else:
            img = self.tissue[int(rng.choice(len(self.tissue), p=self.tissue_p))]
        h, w = img.shape[:2]
        win = self._scale_win(size, rng, min(h, w))
        for _ in range(5):
            if hard:
                y0 = int(np.clip(y - rng.uniform(0.15, 0.85) * win, 0, h - win))
                x0 = int(np.clip(x - rng.uniform(0.15, 0.85) * win, 0, w - win))
            else:
                y0, x0 = int(rng.integers(0, h - win + 1)), int(rng.integers(0, w - win + 1))
            if hard or dm.tissue_mask(img[y0 : y0 + win : 4, x0 : x0 + win : 4]).mean() > 0.3:
                break
        t, _ = self._window(img, y0, x0, win, size, rng)
        z = np.zeros((size, size), np.float32)
        return t, z, np.ones_like(z), np.full((size, size), -1, np.int64)


def tissue_weights(tissue: list[dm.TissueRegion]) -> np.ndarray:
    """Sampling probability of each tissue region: every tissue group (``source.group``:
    MICCAI, CMU, skin, DSB, ...) equally likely, by area within a group, so a group of
    many small tiles (DSB) does not crowd out the others."""
    areas = np.array([t.image.shape[0] * t.image.shape[1] for t in tissue], float)
    groups = np.array([getattr(t.source, "group", "") or t.source.key for t in tissue], object)
    w = np.zeros(len(tissue))
    for g in np.unique(groups):
        m = groups == g
        w[m] = areas[m] / areas[m].sum()
    return w / w.sum()


def _tile(a: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(n*k*k, ..., s, s) windows -> (n, ..., k*s, k*s) canvases, row-major."""
    s = a.shape[-1]
    a = a.reshape(n, k, k, *a.shape[1:])  # (n, k, k, [C,] s, s)
    lead = a.shape[3:-2]
    a = a.permute(0, *range(3, 3 + len(lead)), 1, -2, 2, -1)  # (n, [C,] k, s, k, s)
    return a.reshape(n, *lead, k * s, k * s).contiguous()


def _dist2(size, py, px):
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    return (yy - py) ** 2 + (xx - px) ** 2


def _degrade(img: torch.Tensor, rng, p: float = 0.25) -> torch.Tensor:
    """Lose resolution (down then up sampling) in a fraction of the batch, like 20× scans."""
    out = img.clone()
    size = img.shape[-1]
    for k in range(len(img)):
        if rng.random() < p:
            small = max(8, int(round(size / rng.uniform(1.6, 2.2))))
            t = F.interpolate(img[k : k + 1], size=(small, small), mode="bilinear",
                              align_corners=False, antialias=True)
            out[k] = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out
