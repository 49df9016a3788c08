"""Synthetic single white cells and a tiny WBC model ready to fine-tune (embedding + replay)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_models import tiny_wbc_model_dir

REFERENCE_COLOURS = [(200, 60, 60), (60, 60, 200), (60, 160, 60), (150, 90, 170)]
NEW_LAB = (240, 200, 80)  # a colour the model's reference cells never had


def cell(colour, rng, side: int = 48) -> np.ndarray:
    """A disc of ``colour`` (noisy) on a light background, ``side`` px square."""
    img = np.clip(rng.normal(235, 6, (side, side, 3)), 0, 255)
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3.2) ** 2
    img[disc] = np.clip(rng.normal(colour, 8, (int(disc.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def finetunable_wbc_model(folder: Path) -> Path:
    """The tiny WBC model with an embedding output and a replay of its own calls on
    synthetic reference cells (80 to train, 80 to validate)."""
    from napari_hemato.finetune.embedding import add_embedding_output
    from napari_hemato.finetune.replay import write_replay
    from napari_hemato.models.cell_classifier import CellClassifier

    folder = tiny_wbc_model_dir(folder)
    assert add_embedding_output(folder)
    clf = CellClassifier(folder, threads=1)
    rng = np.random.default_rng(1)
    cells = [cell(REFERENCE_COLOURS[i % 4], rng) for i in range(160)]
    probs, emb = clf.embed_crops(cells, [30.0] * len(cells))
    y = probs.argmax(1)
    write_replay(folder, clf, train_x=emb[:80], train_y=y[:80], val_x=emb[80:], val_y=y[80:],
                 description="synthetic reference cells")
    return folder
