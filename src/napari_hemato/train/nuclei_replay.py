"""Build a nucleus segmenter's ``replay.npz`` through the runtime path (no torch).

Each reference image is resampled to the model's µm/px (as training and evaluation read
it) and run through the ONNX model for its per-pixel features:

- reference training pixels: ``--per-image`` pixels drawn evenly from each training image
  (the images in neither ``extra.validation_images`` nor ``extra.tune_images``);
- reference validation: the centre crop (at most :data:`VAL_CROP` px a side) of each
  validation image, its features and its true nucleus labels.

Features only (D floats per pixel); no image is stored. Run
``python -m napari_hemato.train.nuclei_replay --model MODEL --data ../shared/data``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from napari_hemato.finetune.features import add_features_output
from napari_hemato.finetune.pixels_replay import write_pixels_replay
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.train import data_nuclei as dn
from napari_hemato.train.scripts import replay_main

log = logging.getLogger(__name__)
VAL_CROP = 128


def _pixels(feats: SegmenterFeatures, item, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(features (k, D), flat indices) of ``n`` evenly drawn pixels of ``item`` (all when fewer)."""
    f = feats.run(item.image)
    size = item.labels.size
    idx = np.arange(size) if size <= n else np.sort(rng.choice(size, n, replace=False))
    yy, xx = np.unravel_index(idx, item.labels.shape)
    return f[:, yy, xx].T, idx


def build_replay(model: Path, data: Path, *, per_image: int = 1000, seed: int = 0, threads: int = 2) -> Path:
    """Add the ``features`` output to the model in ``model`` and write its replay there."""
    add_features_output(model, "foreground")
    feats = SegmenterFeatures.load(model, threads=threads)
    extra = feats.spec.extra
    held = {e["key"] for e in extra.get("validation_images", [])} | {e["key"] for e in extra.get("tune_images", [])}
    val_keys = [e["key"] for e in extra.get("validation_images", [])]
    train_keys = [k for k in dn.list_keys(data) if k not in held]
    if not train_keys or not val_keys:
        raise ValueError(f"{model}: needs extra.validation_images and training images in {data}")
    rng = np.random.default_rng(seed)
    train_x = [_pixels(feats, dn.load_image(data, k, targets=False), per_image, rng)[0] for k in train_keys]
    crops = []
    for k in val_keys:
        item = dn.load_image(data, k, targets=False)
        f = feats.run(item.image)  # the whole image: the crop's features as analyze computes them
        h, w = item.labels.shape
        y0, x0 = max((h - VAL_CROP) // 2, 0), max((w - VAL_CROP) // 2, 0)
        sl = (slice(y0, y0 + VAL_CROP), slice(x0, x0 + VAL_CROP))
        crops.append((f[(slice(None), *sl)], item.labels[sl]))
    n_nuclei = sum(len(np.unique(lab)) - 1 for _, lab in crops)
    description = (f"{per_image} pixels of each of {len(train_keys)} training images; centre crops "
                   f"({VAL_CROP} px) of {len(val_keys)} validation images, {n_nuclei} nuclei")
    log.info("replay: %s", description)
    return write_pixels_replay(model, feats.run, train_x=np.concatenate(train_x), val_crops=crops,
                               description=description)


def main(argv: list[str] | None = None) -> int:
    return replay_main(argv, module="napari_hemato.train.nuclei_replay", doc=__doc__, task="nuclei",
                       data_help="the reference data folder (../shared/data)", count="--per-image",
                       default=1000, build=build_replay)


if __name__ == "__main__":
    raise SystemExit(main())
