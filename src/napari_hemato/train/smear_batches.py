"""Training batches of the smear model (torch; ``train`` extra)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from napari_hemato.train import data_smear as ds


class CropSampler:
    """Random scaled, rotated, flipped crops with their targets.

    Crops may extend past the image: there the image is white (the engine's
    pad value) and the targets say background.
    """

    def __init__(self, samples, *, crop: int, scale=(0.8, 1.25), platelet_boost: float = 2.0):
        self.samples = samples
        self.crop = crop
        self.scale = scale
        w = np.array([platelet_boost if (s.classes == 2).any() else 1.0 for s in samples])
        self.p = w / w.sum()

    def _one(self, s: ds.SmearSample, rng: np.random.Generator):
        t = s.targets
        h, w = s.image.shape[:2]
        f = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        win = max(16, int(round(self.crop / f)))
        y0 = int(rng.integers(min(0, h - win) - win // 8, max(0, h - win) + win // 8 + 1))
        x0 = int(rng.integers(min(0, w - win) - win // 8, max(0, w - win) + win // 8 + 1))
        ys, xs = slice(max(y0, 0), min(y0 + win, h)), slice(max(x0, 0), min(x0 + win, w))
        py, px = ys.start - y0, xs.start - x0

        def cut(a, fill, dtype):
            out = np.full((win, win, *a.shape[2:]), fill, dtype)
            out[py : py + ys.stop - ys.start, px : px + xs.stop - xs.start] = a[ys, xs]
            return out

        img = torch.from_numpy(cut(s.image, 255, np.float32)).permute(2, 0, 1)
        maps = torch.from_numpy(np.stack([cut(t["fg"], 0, np.float32), cut(t["dist"], 0, np.float32),
                                          cut(t["w"], 1, np.float32)]))
        cls = torch.from_numpy(cut(t["cls"], -1, np.int64))[None].float()
        if win != self.crop:
            img = F.interpolate(img[None], size=(self.crop, self.crop), mode="bilinear",
                                align_corners=False, antialias=win > self.crop)[0]
            dist = F.interpolate(maps[None, 1:2], size=(self.crop, self.crop), mode="bilinear",
                                 align_corners=False)[0]
            near = F.interpolate(torch.cat([maps, cls])[None], size=(self.crop, self.crop),
                                 mode="nearest")[0]
            maps = torch.cat([near[0:1], dist, near[2:3]])
            cls = near[3:4]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        out = []
        for a in (img, maps, cls):
            a = torch.rot90(a, k, dims=(-2, -1))
            out.append(torch.flip(a, dims=(-1,)) if flip else a)
        return out

    def batch(self, n: int, rng: np.random.Generator):
        items = [self._one(self.samples[i], rng) for i in rng.choice(len(self.samples), n, p=self.p)]
        img, maps, cls = (torch.stack([it[j] for it in items]).contiguous() for j in range(3))
        return img, maps, cls[:, 0].long()


def hue_jitter(batch: torch.Tensor, rng: np.random.Generator, amount: float = 0.04) -> torch.Tensor:
    """Random hue rotation per image of a float [0, 255] batch."""
    from torchvision.transforms.functional import adjust_hue

    out = [adjust_hue(x / 255.0, float(rng.uniform(-amount, amount))) * 255.0 for x in batch]
    return torch.stack(out)


def class_weights(samples) -> torch.Tensor:
    """Inverse-square-root pixel-frequency class weights (max 10, RBC = 1 scale)."""
    counts = np.zeros(len(ds.CLASS_NAMES))
    for s in samples:
        c = s.targets["cls"]
        counts += np.bincount(c[c >= 0], minlength=len(ds.CLASS_NAMES))
    counts = np.maximum(counts, 1)
    w = np.sqrt(counts.max() / counts)
    return torch.tensor(np.minimum(w / w.min(), 10.0), dtype=torch.float32)
