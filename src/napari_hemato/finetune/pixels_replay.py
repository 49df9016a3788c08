"""The replay set of a segmenter: reference pixel features, never images.

``replay.npz`` beside ``model.onnx`` (numpy, read with ``allow_pickle=False``):

- ``kind``: ``"pixels"``;
- ``train_x`` (n, D) float16: features of pixels drawn evenly from the reference training
  images; a fine-tune replays them with the shipped head's own values as labels, so that
  without corrections the refit is the shipped head;
- ``val_x`` (m, D) float16, ``val_labels`` (m,) uint16, ``val_shapes`` (k, 2): the features
  and true nucleus labels of a centre crop of each reference validation image, row after
  row, crop after crop (:func:`val_crops` splits them): a fine-tune is post-processed there
  like ``analyze`` does and may not lose more than a point of their F1 or AJI;
- ``probe_x``: features of the probe image at :data:`PROBE_YX`, to check that the replay
  belongs to the model's trunk (a head refit leaves the trunk, and so the replay, valid);
- ``description``: one line (what the reference set is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.replay import REPLAY, probe_crops, read_replay, same_trunk

#: pixels of the probe image whose features are the probe
PROBE_YX = np.array([[y, x] for y in (20, 64, 100) for x in (24, 64, 110)], np.intp)


def probe_features(run_features) -> np.ndarray:
    """``run_features(image (H, W, 3) uint8) -> (D, H, W)`` at :data:`PROBE_YX`: (9, D)."""
    fmap = run_features(probe_crops(1, 128)[0])
    return fmap[:, PROBE_YX[:, 0], PROBE_YX[:, 1]].T.astype(np.float32)


def write_pixels_replay(folder: str | Path, run_features, *, train_x, val_crops: list[tuple[np.ndarray, np.ndarray]],
                        description: str) -> Path:
    """``val_crops``: ``(features (D, h, w), labels (h, w))`` of each reference validation crop."""
    path = Path(folder) / REPLAY
    val_x = np.concatenate([f.reshape(f.shape[0], -1).T for f, _ in val_crops])
    val_labels = np.concatenate([lab.ravel() for _, lab in val_crops])
    np.savez_compressed(path, kind=np.array("pixels"), train_x=np.asarray(train_x, np.float16),
                        val_x=val_x.astype(np.float16), val_labels=val_labels.astype(np.uint16),
                        val_shapes=np.array([lab.shape for _, lab in val_crops], np.int32),
                        probe_x=probe_features(run_features), description=np.array(description))
    return path


def val_crops(replay: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference validation crops ``(features (D, h, w), labels (h, w))`` of a loaded replay."""
    out, start = [], 0
    for h, w in replay["val_shapes"]:
        n = int(h) * int(w)
        x = replay["val_x"][start : start + n]
        out.append((x.T.reshape(-1, int(h), int(w)), replay["val_labels"][start : start + n].reshape(int(h), int(w))))
        start += n
    return out


def load_pixels_replay(folder: str | Path, run_features) -> dict:
    """The replay of the segmenter in ``folder``, checked against the trunk ``run_features`` runs."""
    path, replay = read_replay(folder, "pixel features")
    if str(replay.get("kind", "")) != "pixels":
        raise HematoError(f"{path}: not the replay of a segmenter (pixel features)")
    if not same_trunk(probe_features(run_features), replay["probe_x"]):
        raise HematoError(f"{path}: the replay was made with another model's trunk")
    out = {"train_x": replay["train_x"].astype(np.float64), "val_x": replay["val_x"].astype(np.float32),
           "val_labels": replay["val_labels"].astype(np.int32), "val_shapes": replay["val_shapes"],
           "description": str(replay["description"])}
    return out
