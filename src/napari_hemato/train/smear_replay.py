"""Build the smear cell detector's ``replay.npz`` through the runtime path (no torch).

- reference training pixels: each BCCD training field (neither tune nor validation) is
  resampled to the model's µm/px (:func:`napari_hemato.core.resample.to_model_grid`, as the
  fine-tune reads corrections) and run through the ONNX model for its per-pixel features;
  ``--per-image`` pixels are drawn from it, a quarter from each of the shipped model's own
  calls (background, RBC, WBC, platelets), weighted back to their share of the field;
- reference fields: every other BCCD validation field (the first, third, ...), as its JPEG
  file and annotated boxes. The other half stays out of the replay, so that a benchmark can
  test a fine-tune on validation fields its reference check never saw
  (``benchmarks/bench_finetune_smear.py``).

Run ``python -m napari_hemato.train.smear_replay --model MODEL --data ../shared/data/bccd``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from napari_hemato.core.resample import to_model_grid
from napari_hemato.finetune.features import add_features_output
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.finetune.smear_replay import write_smear_replay
from napari_hemato.train import data_smear as ds
from napari_hemato.train.scripts import replay_main

log = logging.getLogger(__name__)


def own_calls(feats: SegmenterFeatures, f: np.ndarray) -> np.ndarray:
    """The shipped model's call per pixel: -1 background, else its most probable class."""
    fg, _ = feats.maps(f, feats.init)
    probs = feats.class_maps(f, feats.init_classes)
    threshold = float(feats.spec.postprocess.get("threshold", 0.5))
    return np.where(fg >= threshold, probs.argmax(0), -1)


def drawn_pixels(feats: SegmenterFeatures, image: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(features (k, D), weights (k,))`` of pixels drawn from each of the model's own calls."""
    f = feats.run(image, pad_edges=True)  # as the fine-tune reads a field
    calls = own_calls(feats, f).ravel()
    xs, ws = [], []
    strata = [-1, *range(len(feats.spec.class_names))]
    for c in strata:
        idx = np.flatnonzero(calls == c)
        if not len(idx):
            continue
        pick = idx if len(idx) <= n // len(strata) else rng.choice(idx, n // len(strata), replace=False)
        yy, xx = np.unravel_index(pick, f.shape[1:])
        xs.append(f[:, yy, xx].T)
        ws.append(np.full(len(pick), len(idx) / calls.size / len(pick)))
    return np.concatenate(xs), np.concatenate(ws)


def build_replay(model: Path, data: Path, *, per_image: int = 400, seed: int = 0, threads: int = 2,
                 max_train_fields: int | None = None) -> Path:
    """Add the ``features`` output to the model in ``model`` and write its replay there
    (``max_train_fields``: the first so many training fields only, for a quick check)."""
    add_features_output(model, "foreground")
    feats = SegmenterFeatures.load(model, threads=threads)
    spec = feats.spec
    if feats.init_classes is None:
        raise ValueError(f"{model}: not a smear detector (no class_probs)")
    train, _, val = ds.split_stems(data)
    train = train[:max_train_fields]
    rng = np.random.default_rng(seed)
    xs, ws = [], []
    for stem in train:
        image = ds.read_rgb(data / "JPEGImages" / f"{stem}.jpg")
        grid, _ = to_model_grid(image, None, ds.BCCD_MPP, spec.mpp)
        x, w = drawn_pixels(feats, grid, per_image, rng)
        xs.append(x)
        ws.append(w)
    fields = []
    for stem in val[::2]:
        _, boxes = ds.parse_voc(data / "Annotations" / f"{stem}.xml")
        fields.append({"key": f"bccd/{stem}", "jpeg": (data / "JPEGImages" / f"{stem}.jpg").read_bytes(),
                       "mpp": ds.BCCD_MPP, "boxes": [b.yxyx for b in boxes], "classes": [b.cls for b in boxes]})
    n_boxes = {c: sum(f["classes"].count(c) for f in fields) for c in spec.class_names}
    description = (f"{per_image} pixels of each of {len(train)} BCCD training fields (drawn by the model's own "
                   f"call); {len(fields)} BCCD validation fields (every other one) with "
                   + ", ".join(f"{n} {c}" for c, n in n_boxes.items()) + " boxes")
    log.info("replay: %s", description)
    if (data / "LICENSE").is_file():  # the fields ship with the model: so does their licence
        shutil.copy2(data / "LICENSE", model / "LICENSE-BCCD")
    return write_smear_replay(model, feats.run, train_x=np.concatenate(xs), train_w=np.concatenate(ws),
                              fields=fields, class_names=spec.class_names, description=description)


def main(argv: list[str] | None = None) -> int:
    return replay_main(argv, module="napari_hemato.train.smear_replay", doc=__doc__, task="smear",
                       data_help="a BCCD-layout folder (../shared/data/bccd)", count="--per-image",
                       default=400, build=build_replay)


if __name__ == "__main__":
    raise SystemExit(main())
