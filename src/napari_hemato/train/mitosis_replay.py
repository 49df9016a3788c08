"""Build a mitosis model's ``replay.npz`` from AMi-Br through the runtime path (no torch).

The crops are composed 2×2 into 256-px canvases at 0.25 µm/px (no white border: each crop
sits in other tissue, as training composed its windows) and run through the ONNX model.

- reference training pixels (the slides NOT in the model's ``extra.validation_slides``,
  a seeded sample of ``--train-crops`` crops): the best-scoring pixel within 2 µm of each
  figure (positive), the 3 best-scoring pixels of each crop 10 µm or more from its figure
  (hard negatives) and 2 random pixels there (background); plus hard negatives and
  background of the *training* part of the negative tissue (``data_mitosis.TISSUE_SOURCES``);
- reference validation (every crop of the ``tune`` and ``test`` slides): the 8 best pixels
  within the hit radius (7.5 µm) of each figure, and the 3 hardest negatives of each crop.

Features only (D floats per pixel); no image is stored. Run
``python -m napari_hemato.train.mitosis_replay --model MODEL --data ../shared/data``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from napari_hemato.finetune.features import HeatmapFeatures, add_features_output, sample_features
from napari_hemato.finetune.points_replay import write_points_replay
from napari_hemato.train import data_mitosis as dm
from napari_hemato.train.scripts import replay_main

log = logging.getLogger(__name__)
HIT_UM, POS_UM, FAR_UM = 7.5, 2.0, 10.0
N_VAL_CANDIDATES, N_HARD, N_BACKGROUND = 8, 3, 2


def _pixels_within(centre, radius_px, side=128):
    yy, xx = np.mgrid[:side, :side]
    d = np.hypot(yy - centre[0], xx - centre[1])
    return np.c_[yy.ravel(), xx.ravel()].astype(float), d.ravel() <= radius_px


def _hardest(logit: np.ndarray, yx: np.ndarray, n: int, apart_px: float = 8.0) -> list[int]:
    """Indices of the ``n`` highest logits at least ``apart_px`` from each other."""
    order, out = np.argsort(-logit), []
    for i in order:
        if all(np.hypot(*(yx[i] - yx[j])) >= apart_px for j in out):
            out.append(int(i))
            if len(out) == n:
                break
    return out


def crop_features(feats: HeatmapFeatures, images: np.ndarray, *, mpp: float, rng, validation: bool):
    """Per crop: (positive features (K, D), hard negatives (n, D), background (m, D))."""
    up = feats.head.upsample
    n = len(images)
    pad = (-n) % 4
    images = np.concatenate([images, images[:pad]]) if pad else images
    out = []
    for start in range(0, len(images), 4):
        four = images[start : start + 4]
        canvas = np.concatenate([np.concatenate(four[:2], 1), np.concatenate(four[2:], 1)], 0)
        _, fmap = feats.run(canvas[None])
        for k in range(4):
            if start + k >= n:
                break
            corner = np.array([(k // 2) * 128, (k % 2) * 128], float)
            yx, near = _pixels_within((64, 64), (HIT_UM if validation else POS_UM) / mpp)
            _, far_mask = _pixels_within((64, 64), FAR_UM / mpp)
            far = ~far_mask
            x = sample_features(fmap[0], yx + corner, up)
            z = feats.logit(x)
            near_i = np.flatnonzero(near)
            top = near_i[np.argsort(-z[near_i])[: (N_VAL_CANDIDATES if validation else 1)]]
            far_i = np.flatnonzero(far)
            hard = far_i[_hardest(z[far_i], yx[far_i], N_HARD)]
            bg = rng.choice(far_i, N_BACKGROUND, replace=False)
            out.append((x[top], x[hard], x[bg]))
    return out


def tissue_features(feats: HeatmapFeatures, regions, *, rng, window: int = 256, per_window: int = 4):
    """Hard negatives and background of negative tissue regions, window by window."""
    up, hard, bg = feats.head.upsample, [], []
    for region in regions:
        img = region.image
        for y in range(0, max(img.shape[0] - window, 0) + 1, window):
            for x in range(0, max(img.shape[1] - window, 0) + 1, window):
                win = img[y : y + window, x : x + window]
                if win.shape[:2] != (window, window) or dm.tissue_mask(win).mean() < 0.3:
                    continue
                _, fmap = feats.run(win[None])
                yy, xx = np.mgrid[16 : window - 16 : 2, 16 : window - 16 : 2]
                yx = np.c_[yy.ravel(), xx.ravel()].astype(float)
                f = sample_features(fmap[0], yx, up)
                z = feats.logit(f)
                hard.append(f[_hardest(z, yx, per_window)])
                bg.append(f[rng.choice(len(f), per_window // 2, replace=False)])
    return np.concatenate(hard), np.concatenate(bg)


def build_replay(model: Path, data: Path, *, train_crops: int = 800, seed: int = 0, threads: int = 2) -> Path:
    add_features_output(model)
    feats = HeatmapFeatures.load(model, threads=threads)
    spec = feats.predictor.spec
    held = spec.extra.get("validation_slides", {})
    val_slides = set(held.get("tune", [])) | set(held.get("test", []))
    if not val_slides:
        raise ValueError(f"{model}: model.json records no validation_slides (extra)")
    frame = dm.read_crops_table(data)
    if not len(frame):
        raise ValueError(f"{data}: no AMi-Br crops.csv")
    rng = np.random.default_rng(seed)
    train = frame[~frame["slide"].isin(val_slides)].sort_values("file").reset_index(drop=True)
    train = train.iloc[np.sort(rng.permutation(len(train))[:train_crops])]
    val = frame[frame["slide"].isin(val_slides)].sort_values("file").reset_index(drop=True)
    assert not set(train["slide"]) & val_slides  # never a validation slide in the training replay
    t0 = time.perf_counter()
    mpp = float(spec.mpp)
    tr = crop_features(feats, dm.load_crops(train, mpp=mpp).images, mpp=mpp, rng=rng, validation=False)
    va = crop_features(feats, dm.load_crops(val, mpp=mpp).images, mpp=mpp, rng=rng, validation=True)
    root = data.parent if (data / "crops.csv").is_file() else data  # the tissue is beside AMi-Br
    regions = dm.tissue_regions(root, part="train", mpp=mpp)
    if not regions:
        raise ValueError(f"{root}: none of the negative tissue images (data_mitosis.TISSUE_SOURCES)")
    t_hard, t_bg = tissue_features(feats, regions, rng=rng)
    log.info("features of %d + %d crops and the training tissue in %.0f s", len(tr), len(va),
             time.perf_counter() - t0)
    pos = np.concatenate([p for p, _, _ in tr])
    neg = np.concatenate([np.concatenate([h, b]) for _, h, b in tr] + [t_hard, t_bg])
    train_x = np.concatenate([pos, neg])
    train_y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    desc = (f"AMi-Br (research use): {len(val)} figures of the model's {len(val_slides)} validation "
            f"slides (tune + test); replay {len(train)} training figures (seed {seed}), their hard "
            "negatives and the training tissue's")
    return write_points_replay(model, feats, train_x=train_x, train_y=train_y,
                               val_pos_x=np.stack([p for p, _, _ in va]),
                               val_neg_x=np.concatenate([h for _, h, _ in va]), description=desc)


def main(argv: list[str] | None = None) -> int:
    return replay_main(argv, module="napari_hemato.train.mitosis_replay", doc=__doc__, task="mitosis",
                       data_help="../shared/data (AMi-Br crops and the negative tissue)",
                       count="--train-crops", default=800, build=build_replay)


if __name__ == "__main__":
    raise SystemExit(main())
