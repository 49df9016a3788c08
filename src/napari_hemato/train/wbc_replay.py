"""Build a WBC model's ``replay.npz`` from PBC through the runtime path (no torch).

Reference training cells: a seeded sample of ``--per-class`` cells of each class among the
PBC images that are NOT in the model's validation list; reference validation: every image
of that list (``model.json`` extra.split.validation_files). Embeddings only (D floats per
cell); no image is stored. Run
``python -m napari_hemato.train.wbc_replay --model MODEL --data ../shared/data/pbc``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from napari_hemato.finetune.embedding import add_embedding_output
from napari_hemato.finetune.replay import write_replay
from napari_hemato.io.cell_images import list_cell_images, load_rgb
from napari_hemato.models.cell_classifier import CLASS_NAMES, CellClassifier
from napari_hemato.train.scripts import replay_main

log = logging.getLogger(__name__)


def _embed(clf, root: Path, files: list[str], batch: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(files), batch):
        images = [load_rgb(root / f) for f in files[start : start + batch]]
        out.append(clf.embed_crops(images)[1])  # diameters estimated, as classify-cells does
    return np.concatenate(out)


def build_replay(model: Path, pbc: Path, *, per_class: int = 100, seed: int = 0, threads: int = 2) -> Path:
    add_embedding_output(model)
    clf = CellClassifier(model, threads=threads)
    val_files = list(clf.spec.extra.get("split", {}).get("validation_files", []))
    if not val_files:
        raise ValueError(f"{model}: model.json records no validation_files (extra.split)")
    listing = list_cell_images(pbc)
    val_set = set(val_files)
    train = listing[~listing["path"].isin(val_set)]
    rng = np.random.default_rng(seed)
    picked = []
    for name in CLASS_NAMES:
        paths = sorted(train.loc[train["class"] == name, "path"])
        picked += [paths[i] for i in sorted(rng.permutation(len(paths))[:per_class])]
    label = dict(zip(listing["path"], listing["label"], strict=True))
    t0 = time.perf_counter()
    train_x = _embed(clf, pbc, picked)
    val_x = _embed(clf, pbc, val_files)
    log.info("embedded %d + %d cells in %.0f s", len(picked), len(val_files), time.perf_counter() - t0)
    desc = (f"PBC (Acevedo et al. 2020, CC BY 4.0): {len(val_files)} held-out images of the model's "
            f"validation list; replay {per_class} training images per class (seed {seed})")
    return write_replay(model, clf, train_x=train_x, train_y=[label[p] for p in picked], val_x=val_x,
                        val_y=[label[p] for p in val_files], description=desc)


def main(argv: list[str] | None = None) -> int:
    return replay_main(argv, module="napari_hemato.train.wbc_replay", doc=__doc__, task="WBC",
                       data_help="the PBC folder (class folders)", count="--per-class", default=100,
                       build=build_replay)


if __name__ == "__main__":
    raise SystemExit(main())
