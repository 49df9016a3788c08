"""Pixel features around corrected points, read as the engine reads the image.

Each corrected point gets a window of the model's work grid (the level and resampling
:class:`~napari_hemato.core.geometry.WorkGrid` chooses for the model's µm/px, as in
``analyze``) centred on it; the model computes its heatmap and features there. Samples:

- a kept or added figure: the features of the pixel the model scores highest within
  :data:`POSITIVE_UM` of the point (one sample; its *disc* is kept for evaluation);
- a rejected point: the :data:`TOP_K` highest-scoring pixels within :data:`NEGATIVE_UM`
  (the blob the model called a figure), away from any figure;
- background: a few random pixels of each window at least :data:`BACKGROUND_UM` from any point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_hemato.finetune.features import HeatmapFeatures, sample_features
from napari_hemato.finetune.points_data import CorrectedImage

POSITIVE_UM = 2.0
NEGATIVE_UM = 4.0
NEGATIVE_CLEAR_UM = 5.0  # rejected-blob pixels this close to a figure are not negatives
BACKGROUND_UM = 10.0
TOP_K = 8
BACKGROUND_PER_WINDOW = 4
MIN_WINDOW = 256  # work-grid px; at least the receptive field on each side of the point (see _window)


def _window(spec) -> int:
    """The window side: the point plus the receptive field on each side, to the size divisor."""
    side = max(MIN_WINDOW, 2 * int(spec.receptive_field_px) + 32)
    div = max(int(spec.size_divisor), 1)
    return -(-side // div) * div


@dataclass
class PointSamples:
    """Features of one image's corrections. ``*_discs``: per point, the (k, D) features of
    its disc (evaluation: a figure is kept / a rejection holds when the disc's best logit
    is above / below the threshold)."""

    pos_x: np.ndarray  # (p, D)
    neg_x: np.ndarray  # (n, D), TOP_K per rejected point
    neg_group: np.ndarray  # (n,) index of the rejected point
    bg_x: np.ndarray  # (b, D)
    pos_discs: list = field(default_factory=list)
    neg_discs: list = field(default_factory=list)


def _disc(radius_px: float, step: int = 1) -> np.ndarray:
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r : r + 1 : step, -r : r + 1 : step]
    keep = yy**2 + xx**2 <= radius_px**2
    return np.c_[yy[keep], xx[keep]].astype(np.float64)


def image_samples(item: CorrectedImage, feats: HeatmapFeatures, *, seed: int = 0,
                  batch: int = 4, progress=None) -> PointSamples:
    """The :class:`PointSamples` of one corrected image (see module docstring)."""
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.slide import open_slide

    spec = feats.predictor.spec
    up = feats.head.upsample
    rng = np.random.default_rng(seed)
    d = len(feats.weight)
    with open_slide(item.image, mpp=item.mpp) as slide:
        grid = WorkGrid.for_model(slide, spec.mpp, assumed_mpp=spec.assumed_input_mpp)
        mpp = grid.mpp
        origin = np.array(grid.roi[:2], np.float64)

        def to_work(yx):
            return (np.asarray(yx, np.float64).reshape(-1, 2) - origin + 0.5) / grid.factor - 0.5

        pos_w, neg_w = to_work(item.positives), to_work(item.negatives)
        all_w = np.r_[pos_w, neg_w, to_work(item.others)]
        points = [("pos", k, p) for k, p in enumerate(pos_w)] + [("neg", k, p) for k, p in enumerate(neg_w)]
        pos_disc, neg_disc = _disc(POSITIVE_UM / mpp), _disc(NEGATIVE_UM / mpp, 2)
        out = PointSamples(np.zeros((len(pos_w), d)), np.zeros((0, d)), np.zeros(0, int), np.zeros((0, d)),
                           [None] * len(pos_w), [None] * len(neg_w))
        neg_x, neg_g, bg_x = [], [], []
        window = _window(spec)
        half = window // 2
        for start in range(0, len(points), batch):
            if progress is not None:
                progress(start, len(points))
            chunk = points[start : start + batch]
            # the engine's tiles start at multiples of the tile size minus the halo: the same
            # phase modulo the size divisor gives the window the engine's stride-grid alignment
            phase, div = -spec.halo, max(int(spec.size_divisor), 1)
            corners = [((np.floor(p).astype(int) - half - phase) // div) * div + phase for _, _, p in chunk]
            images = np.stack([grid.read(slide, (int(y), int(x), int(y) + window, int(x) + window),
                                         fill=spec.pad_value) for y, x in corners])
            _, fmap = feats.run(images)
            for (what, k, p), corner, f in zip(chunk, corners, fmap, strict=True):
                local = p - corner
                if what == "pos":
                    yx = local + pos_disc
                    disc_x = sample_features(f, yx, up)
                    out.pos_discs[k] = disc_x
                    out.pos_x[k] = disc_x[int(np.argmax(feats.logit(disc_x)))]
                else:
                    yx = local + neg_disc
                    if len(pos_w):
                        dist = np.hypot(*(yx[:, None, :] + corner - pos_w[None]).transpose(2, 0, 1)).min(1)
                        yx = yx[dist * mpp >= NEGATIVE_CLEAR_UM]
                    if not len(yx):
                        continue
                    disc_x = sample_features(f, yx, up)
                    out.neg_discs[k] = disc_x
                    top = np.argsort(-feats.logit(disc_x))[:TOP_K]
                    neg_x.append(disc_x[top])
                    neg_g.append(np.full(len(top), k))
                cand = rng.uniform(0, window, (16 * BACKGROUND_PER_WINDOW, 2))
                far = np.hypot(*(cand[:, None, :] + corner - all_w[None]).transpose(2, 0, 1)).min(1)
                cand = cand[far * mpp >= BACKGROUND_UM][:BACKGROUND_PER_WINDOW]
                if len(cand):
                    bg_x.append(sample_features(f, cand, up))
    if neg_x:
        out.neg_x, out.neg_group = np.concatenate(neg_x), np.concatenate(neg_g)
    if bg_x:
        out.bg_x = np.concatenate(bg_x)
    return out
