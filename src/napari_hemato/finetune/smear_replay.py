"""The replay set of the smear cell detector: reference pixel features and reference fields.

``replay.npz`` beside ``model.onnx`` (numpy, read with ``allow_pickle=False``):

- ``kind``: ``"smear"``;
- ``train_x`` (n, D) float16 and ``train_w`` (n,): features of pixels of the reference
  training fields, drawn by the shipped model's own call (background, each class) and
  weighted back to their share; a fine-tune replays them with the shipped head's own
  values as labels, so that without corrections the refit is the shipped head;
- the reference fields: ``ref_jpeg`` (the files' bytes, one after another, split at
  ``ref_offsets``), ``ref_keys``, ``ref_mpp`` (their µm/px) and their annotated boxes
  (``ref_boxes`` level-0 ``y0, x0, y1, x1``, ``ref_box_field``, ``ref_box_class`` indexing the
  spec's ``class_names``). BCCD fields (MIT licence): small, so they ship as images and the
  fine-tune scores them through the engine's own post-processing (stain rule included);
- ``probe_x``: features of the probe image at :data:`~napari_hemato.finetune.pixels_replay.PROBE_YX`
  (the replay belongs to the model's trunk);
- ``description``: one line (what the reference set is).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.pixels_replay import probe_features
from napari_hemato.finetune.replay import REPLAY, read_replay, same_trunk


@dataclass
class ReferenceField:
    """One reference field: level-0 pixels, pixel size and annotated boxes."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8
    mpp: float
    boxes: np.ndarray  # (m, 4) level-0 y0, x0, y1, x1
    classes: np.ndarray  # (m,) class names


def write_smear_replay(folder: str | Path, run_features, *, train_x, train_w, fields: list[dict],
                       class_names, description: str) -> Path:
    """``fields``: ``{"key", "jpeg" (bytes), "mpp", "boxes" (m, 4), "classes" (m names)}``."""
    path = Path(folder) / REPLAY
    blobs = [np.frombuffer(f["jpeg"], np.uint8) for f in fields]
    offsets = np.cumsum([0, *[len(b) for b in blobs]]).astype(np.int64)
    names = list(class_names)
    boxes = np.concatenate([np.asarray(f["boxes"], np.float32).reshape(-1, 4) for f in fields])
    field_of = np.concatenate([np.full(len(f["boxes"]), k, np.int32) for k, f in enumerate(fields)])
    cls = np.array([names.index(c) for f in fields for c in f["classes"]], np.int8)
    mpp = {float(f["mpp"]) for f in fields}
    if len(mpp) != 1:
        raise ValueError(f"reference fields of several pixel sizes: {sorted(mpp)}")
    np.savez_compressed(path, kind=np.array("smear"), train_x=np.asarray(train_x, np.float16),
                        train_w=np.asarray(train_w, np.float32), ref_jpeg=np.concatenate(blobs),
                        ref_offsets=offsets, ref_keys=np.array([f["key"] for f in fields]),
                        ref_mpp=np.array(mpp.pop()), ref_boxes=boxes, ref_box_field=field_of,
                        ref_box_class=cls, probe_x=probe_features(run_features),
                        description=np.array(description))
    return path


def load_smear_replay(folder: str | Path, run_features, class_names) -> dict:
    """The replay of the smear model in ``folder``, checked against the trunk ``run_features`` runs:
    ``train_x``, ``train_w``, ``fields`` (:class:`ReferenceField`) and ``description``."""
    from imagecodecs import jpeg8_decode

    path, replay = read_replay(folder, "pixel features and fields")
    if str(replay.get("kind", "")) != "smear":
        raise HematoError(f"{path}: not the replay of a smear cell detector")
    if not same_trunk(probe_features(run_features), replay["probe_x"]):
        raise HematoError(f"{path}: the replay was made with another model's trunk")
    names = np.asarray(list(class_names), object)
    jpeg, offsets = replay["ref_jpeg"], replay["ref_offsets"]
    fields = []
    for k, key in enumerate(replay["ref_keys"]):
        image = np.asarray(jpeg8_decode(jpeg[offsets[k] : offsets[k + 1]].tobytes()))
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        sel = replay["ref_box_field"] == k
        fields.append(ReferenceField(str(key), np.ascontiguousarray(image[..., :3]), float(replay["ref_mpp"]),
                                     replay["ref_boxes"][sel].astype(np.float64),
                                     names[replay["ref_box_class"][sel].astype(int)].astype(str)))
    return {"train_x": replay["train_x"].astype(np.float64), "train_w": replay["train_w"].astype(np.float64),
            "fields": fields, "description": str(replay["description"])}
