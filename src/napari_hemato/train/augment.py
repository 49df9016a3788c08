"""Training-time augmentation in torch (``train`` extra).

- :func:`geometric_crop`: random scaled crop + flips + rot90 of aligned arrays;
- :class:`ColorAugment`: HED stain jitter, brightness / contrast / saturation,
  blur, JPEG re-compression of a float [0, 255] batch;
- :class:`StainAugment`: batched HED stain, white-balance and hue jitter in
  front of :class:`ColorAugment` (other labs' stains and cameras; white cells).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

# Ruifrok & Johnston stain vectors, as in skimage.color (rgb_from_hed)
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def geometric_crop(
    arrays: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    *,
    scale_range: tuple[float, float] = (0.8, 1.2),
    modes: Sequence[str] = (),
    pad_values: Sequence[float] = (),
) -> list[torch.Tensor]:
    """Random scaled crop + flips + rot90 of aligned (C, H, W) arrays.

    A window of ``size / s`` source pixels (``s`` drawn log-uniformly from
    ``scale_range``) is cut at a random place, padded with the edge value of
    each array when the image is smaller, and resized to ``size`` with
    ``modes[i]`` (``"bilinear"`` default, ``"nearest"`` for labels).

    Returns float32 (C, size, size) tensors.
    """
    h, w = arrays[0].shape[-2:]
    s = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    win = max(8, int(round(size / s)))
    y0 = int(rng.integers(0, max(h - win, 0) + 1))
    x0 = int(rng.integers(0, max(w - win, 0) + 1))
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    ph, pw = max(win - h, 0), max(win - w, 0)
    top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
    out = []
    for i, a in enumerate(arrays):
        t = torch.from_numpy(np.ascontiguousarray(a[..., y0 : y0 + win, x0 : x0 + win]))
        t = t.float()
        if ph or pw:
            value = float(pad_values[i]) if i < len(pad_values) else 0.0
            t = F.pad(t, (left, pw - left, top, ph - top), value=value)
        mode = modes[i] if i < len(modes) else "bilinear"
        if win != size:
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": win > size}
            t = F.interpolate(t[None], size=(size, size), mode=mode, **kw)[0]
        t = torch.rot90(t, k, dims=(-2, -1))
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(t.contiguous())
    return out


class ColorAugment:
    """Photometric augmentation of a float RGB batch in [0, 255] (N, 3, H, W).

    Each image independently gets, with the given probabilities: HED stain
    jitter (per-stain scale ``1 ± hed_sigma`` and shift ``± hed_shift`` in
    optical-density space), brightness / contrast / saturation jitter, a
    gaussian blur, and JPEG re-compression at quality 30–95.

    ``p_eosin`` (default 0: off) is the chance, within a stain jitter, that
    eosin is also scaled by a factor from ``eosin_range``: haematoxylin-heavy
    stains with little pink (as in the DSB 2018 tissue) so that a detector
    does not learn "little eosin means no figure" from negatives alone.
    """

    def __init__(
        self,
        *,
        hed_sigma: float = 0.08,
        hed_shift: float = 0.03,
        p_hed: float = 0.9,
        brightness: float = 0.15,
        contrast: float = 0.2,
        saturation: float = 0.25,
        p_bcs: float = 0.8,
        p_blur: float = 0.25,
        blur_sigma: tuple[float, float] = (0.3, 1.2),
        p_jpeg: float = 0.3,
        jpeg_quality: tuple[int, int] = (30, 95),
        p_gray: float = 0.03,
        p_eosin: float = 0.0,
        eosin_range: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self._hed_from_rgb = torch.tensor(_HED_FROM_RGB, dtype=torch.float32)
        self._rgb_from_hed = torch.tensor(_RGB_FROM_HED, dtype=torch.float32)

    def _hed(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # x (3, H, W) in [0, 255] -> optical density -> stains -> jitter -> back
        od = -torch.log(torch.clamp(x, min=1.0) / 255.0)
        hed = torch.einsum("chw,cd->dhw", od, self._hed_from_rgb)
        alpha = torch.tensor(rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, 3))
        if self.p_eosin > 0 and rng.random() < self.p_eosin:  # no draw when off: same streams
            alpha[1] *= float(rng.uniform(*self.eosin_range))
        beta = torch.tensor(rng.uniform(-self.hed_shift, self.hed_shift, 3))
        hed = hed * alpha.float()[:, None, None] + beta.float()[:, None, None]
        od = torch.einsum("dhw,dc->chw", hed, self._rgb_from_hed)
        return torch.clamp(255.0 * torch.exp(-od), 0.0, 255.0)

    def __call__(self, batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg
        from torchvision.transforms.functional import gaussian_blur

        out = []
        for x in batch:
            if rng.random() < self.p_hed:
                x = self._hed(x, rng)
            if rng.random() < self.p_bcs:
                b = rng.uniform(-self.brightness, self.brightness) * 255.0
                c = rng.uniform(1 - self.contrast, 1 + self.contrast)
                s = rng.uniform(1 - self.saturation, 1 + self.saturation)
                gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
                x = gray + (x - gray) * s
                x = (x - x.mean()) * c + x.mean() + b
            if rng.random() < self.p_gray:
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].expand(3, -1, -1)
            if rng.random() < self.p_blur:
                sig = float(rng.uniform(*self.blur_sigma))
                ks = 2 * int(math.ceil(2.5 * sig)) + 1
                x = gaussian_blur(x[None], [ks, ks], [sig, sig])[0]
            x = torch.clamp(x, 0.0, 255.0)
            if rng.random() < self.p_jpeg:
                q = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
                x = decode_jpeg(encode_jpeg(x.round().to(torch.uint8), quality=q)).float()
            out.append(x)
        return torch.stack(out)


class StainAugment:
    """Colour augmentation of a float [0, 255] NCHW batch.

    Batched HED stain jitter (per-stain scale ``1 ± hed_sigma``, shift
    ``± hed_shift`` in optical density, Ruifrok-Johnston vectors), a
    white-balance (per-channel gain) jitter and hue rotation, which model
    other labs' stains and cameras; then
    :class:`ColorAugment` for brightness /
    contrast / saturation, blur and JPEG re-compression (quality 50-95).

    Parameters
    ----------
    profile : {"strong", "mild"}
        Jitter ranges (see ``PROFILES``); "strong" also covers the paler,
        bluer, blurrier look of other labs' smears.

    Examples
    --------
    >>> aug = StainAugment("mild")  # doctest: +SKIP
    >>> out = aug(torch.full((2, 3, 32, 32), 200.0), np.random.default_rng(0))  # doctest: +SKIP
    """

    PROFILES = {
        # epochs 1-4 of the bundled model
        "mild": {"hed_sigma": 0.12, "hed_shift": 0.04, "hue": 0.04, "p_hue": 0.4, "gain": 0.07,
                 "brightness": 0.12, "contrast": 0.2, "saturation": 0.25, "p_blur": 0.25,
                 "blur_sigma": (0.3, 1.3), "p_gray": 0.0},
        # other labs: paler / bluer stains, blurrier optics (e.g. BCCD fields)
        "strong": {"hed_sigma": 0.2, "hed_shift": 0.05, "hue": 0.08, "p_hue": 0.5, "gain": 0.1,
                   "brightness": 0.15, "contrast": 0.3, "saturation": 0.4, "p_blur": 0.35,
                   "blur_sigma": (0.3, 2.0), "p_gray": 0.05},
    }

    def __init__(self, profile: str = "strong") -> None:
        if profile not in self.PROFILES:
            raise ValueError(f"colour profile {profile!r} is not one of {sorted(self.PROFILES)}")
        q = self.PROFILES[profile]
        self.profile = profile
        self.color = ColorAugment(p_hed=0.0, brightness=q["brightness"], contrast=q["contrast"],
                                  saturation=q["saturation"], p_bcs=0.8, p_blur=q["p_blur"],
                                  blur_sigma=q["blur_sigma"], p_jpeg=0.4, jpeg_quality=(50, 95),
                                  p_gray=q["p_gray"])
        self.hed_from_rgb = torch.tensor(_HED_FROM_RGB.T, dtype=torch.float32)  # hed = M @ od
        self.rgb_from_hed = torch.tensor(_RGB_FROM_HED.T, dtype=torch.float32)
        self.hed_sigma, self.hed_shift, self.p_hed = q["hed_sigma"], q["hed_shift"], 0.8
        self.hue, self.p_hue, self.gain, self.p_gain = q["hue"], q["p_hue"], q["gain"], 0.5

    def __call__(self, batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms.functional import adjust_hue

        n, c, h, w = batch.shape
        on = torch.from_numpy(rng.random(n) < self.p_hed)
        alpha = torch.from_numpy(rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, (n, 3, 1))).float()
        beta = torch.from_numpy(rng.uniform(-self.hed_shift, self.hed_shift, (n, 3, 1))).float()
        alpha[~on], beta[~on] = 1.0, 0.0
        od = -torch.log(torch.clamp(batch, min=1.0) / 255.0).reshape(n, c, h * w)
        hed = torch.matmul(self.hed_from_rgb, od) * alpha + beta
        x = torch.clamp(255.0 * torch.exp(-torch.matmul(self.rgb_from_hed, hed)), 0, 255).reshape(n, c, h, w)
        x = torch.where(on[:, None, None, None], x, batch)
        gains = torch.from_numpy(rng.uniform(1 - self.gain, 1 + self.gain, (n, 3))).float()
        gains[torch.from_numpy(rng.random(n) >= self.p_gain)] = 1.0
        x = torch.clamp(x * gains[:, :, None, None], 0, 255)
        hues = rng.uniform(-self.hue, self.hue, n)
        hue_on = rng.random(n) < self.p_hue
        if hue_on.any():
            x = x.clone()
            for i in np.flatnonzero(hue_on):
                x[i] = adjust_hue(x[i] / 255.0, float(hues[i])) * 255.0
        return self.color(x, rng)
