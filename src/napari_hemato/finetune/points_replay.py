"""The replay set of a points (heatmap) model: reference pixel features, never images.

``replay.npz`` beside ``model.onnx`` (numpy, read with ``allow_pickle=False``):

- ``kind``: ``"points"``;
- ``train_x`` (n, D) float16, ``train_y`` (n,) int8: features of reference training pixels,
  1 = a figure's centre, 0 = a negative (hard negatives and background), replayed in every
  fine-tune so the heatmap keeps what it learnt;
- ``val_pos_x`` (m, K, D) float16: for each figure of the reference validation slides, the
  features of the K pixels within the hit radius the model scores highest; a figure is
  found when one of them reaches the threshold (the *reference recall*);
- ``val_neg_x`` (q, D) float16: hard negatives of the validation slides (reported);
- ``probe_x``: features of :func:`probe_image` at :data:`PROBE_YX`, to check that the
  replay belongs to the model's trunk (a head refit leaves the trunk, and so the replay, valid);
- ``description``: one line (what the reference set is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.features import HeatmapFeatures, sample_features
from napari_hemato.finetune.replay import REPLAY, probe_crops, read_replay, same_trunk

#: heatmap pixels of :func:`probe_image` whose features are the probe
PROBE_YX = np.array([[y, x] for y in (20, 64, 100) for x in (24, 64, 110)], np.float64)


def probe_image(side: int = 128) -> np.ndarray:
    """A deterministic image (a dark disc on a light, noisy field)."""
    return probe_crops(1, side)[0]


def probe_features(feats: HeatmapFeatures) -> np.ndarray:
    _, fmap = feats.run(probe_image()[None])
    return sample_features(fmap[0], PROBE_YX, feats.head.upsample)


def write_points_replay(folder: str | Path, feats: HeatmapFeatures, *, train_x, train_y, val_pos_x,
                        val_neg_x, description: str) -> Path:
    path = Path(folder) / REPLAY
    np.savez_compressed(path, kind=np.array("points"),
                        train_x=np.asarray(train_x, np.float16), train_y=np.asarray(train_y, np.int8),
                        val_pos_x=np.asarray(val_pos_x, np.float16),
                        val_neg_x=np.asarray(val_neg_x, np.float16),
                        probe_x=probe_features(feats).astype(np.float32),
                        description=np.array(description))
    return path


def load_points_replay(folder: str | Path, feats: HeatmapFeatures) -> dict:
    """The replay of the points model in ``folder``, checked against ``feats``' trunk."""
    path, replay = read_replay(folder, "features")
    if str(replay.get("kind", "")) != "points":
        raise HematoError(f"{path}: not the replay of a points (heatmap) model")
    probe = replay["probe_x"]
    # relative L2 per probe row, as the WBC replay: another CPU's last digits differ
    if probe.shape[1] != len(feats.weight) or not same_trunk(probe_features(feats), probe):
        raise HematoError(f"{path}: the replay was made with another model's trunk")
    out = {k: replay[k].astype(np.float64) for k in ("train_x", "val_pos_x", "val_neg_x")}
    out["train_y"] = replay["train_y"].astype(int)
    out["description"] = str(replay["description"])
    return out
