"""White cells with *coarse* labels (NEU, EO, LY, ...) inside field images.

Another laboratory's data rarely comes with the 11 PBC classes: a reviewer
may only say "neutrophil" (SNE or BNE) or "immature granulocyte" (MMY, MY or
PMY). Such a label is a set of allowed classes; the classifier is trained on
it with the *partial-label* loss ``-log sum_{c in group} p_c``, which pushes
the probability mass into the group without deciding between its members
(:func:`group_nll`; torch lives in :mod:`napari_hemato.train.wbc`).

A source is a CSV with columns ``image, bbox_y0, bbox_x0, bbox_y1, bbox_x1,
group`` and optionally ``split`` (``train`` / ``val``): ``image`` is a file
name (a stem gets ``.jpg``/``.png``/``.tif``) in an image folder; the cell is
centred on its box and its diameter is the mean box side. Rows whose group
is not one of :data:`GROUPS` (e.g. ``?``) are skipped. The package ships one
such table: ``bccd_wbc_groups.csv`` (see :mod:`napari_hemato.train.evaluate_wbc`).

Torch-free (numpy, pandas, Pillow).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from napari_hemato.core.classes import WBC_GROUPS
from napari_hemato.models.cell_classifier import CLASS_NAMES, normalize_cell
from napari_hemato.train.data_wbc import augmented_window, load_rgb, runtime_inputs

log = logging.getLogger(__name__)

#: coarse groups (the 8 groups of the PBC paper) and the classes each allows
GROUPS = WBC_GROUPS
#: the package's developer-labelled BCCD table
BCCD_GROUPS_CSV = Path(__file__).with_name("bccd_wbc_groups.csv")
_SUFFIXES = ("", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def group_mask(groups, names=CLASS_NAMES) -> np.ndarray:
    """(n, len(names)) bool: which classes each group label allows.

    Examples
    --------
    >>> group_mask(["NEU", "LY"]).astype(int)[:, :5].tolist()
    [[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    """
    names = list(names)
    out = np.zeros((len(groups), len(names)), bool)
    for i, g in enumerate(groups):
        out[i, [names.index(m) for m in GROUPS[g]]] = True
    return out


def read_coarse_table(csv: str | Path, *, split: str | None = None) -> pd.DataFrame:
    """The usable rows of a coarse-label CSV (known groups; ``split`` rows only if given)."""
    table = pd.read_csv(csv)
    need = {"image", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "group"}
    missing = need - set(table.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)}")
    table = table[table["group"].isin(GROUPS)]
    if split is not None:
        if "split" not in table:
            raise ValueError(f"{csv}: no 'split' column to select {split!r} rows")
        table = table[table["split"] == split]
    return table.reset_index(drop=True)


class FieldCells:
    """Coarse-labelled cells of one CSV, their field images in memory.

    Parameters
    ----------
    csv : path
        Coarse-label table (see the module docstring).
    image_dir : path
        Folder of the field images.
    split : str, optional
        Keep only rows of this split.
    scale : WindowScale, optional
        Red-cell scale: each field is measured once by the red-cell ruler (as
        ``classify_in_image`` does without ``mpp``) and windows are physical.

    Examples
    --------
    >>> cells = FieldCells(BCCD_GROUPS_CSV, "../shared/data/bccd/JPEGImages", split="train")  # doctest: +SKIP
    >>> cells.sample(0, np.random.default_rng(0), size=128, context=1.5).shape  # doctest: +SKIP
    (128, 128, 3)
    """

    def __init__(self, csv: str | Path, image_dir: str | Path, *, split: str | None = None,
                 scale=None) -> None:
        self.table = read_coarse_table(csv, split=split)
        image_dir = Path(image_dir)
        self.fields: dict[str, np.ndarray] = {}
        for name in sorted(set(self.table["image"].astype(str))):
            path = next((image_dir / f"{name}{s}" for s in _SUFFIXES
                         if (image_dir / f"{name}{s}").is_file()), None)
            if path is None:
                raise FileNotFoundError(f"{image_dir}: no image {name!r} (listed in {csv})")
            self.fields[name] = load_rgb(path)
        b = self.table[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]].to_numpy(float)
        self.centres = np.stack([(b[:, 0] + b[:, 2] - 1) / 2, (b[:, 1] + b[:, 3] - 1) / 2], 1)
        self.diameters = ((b[:, 2] - b[:, 0]) + (b[:, 3] - b[:, 1])) / 2
        self.groups = self.table["group"].astype(str).to_numpy()
        self.masks = group_mask(self.groups)
        self.sides = None  # red-cell scale: window side (px) of each cell
        if scale is not None and scale.mode != "self":
            from napari_hemato.models.cell_classifier import image_sides

            self.sides = np.zeros(len(self))
            for name, rows in self.table.groupby("image", sort=True):
                idx = rows.index.to_numpy()
                self.sides[idx] = image_sides(scale, self.fields[str(name)], self.centres[idx],
                                              self.diameters[idx])
        log.info("%s: %d coarse-labelled cells in %d images (%s)", Path(csv).name, len(self),
                 len(self.fields), self.table["group"].value_counts().to_dict())

    def __len__(self) -> int:
        return len(self.table)

    def _field(self, i: int) -> np.ndarray:
        return self.fields[str(self.table["image"].iloc[i])]

    def runtime_input(self, i: int, *, size: int, context: float) -> np.ndarray:
        """The window the runtime classifies for cell ``i`` (as ``classify_in_image``)."""
        side = None if self.sides is None else self.sides[i]
        return normalize_cell(self._field(i), self.centres[i], self.diameters[i], context=context,
                              size=size, side_px=side)[0]

    def sample(self, i: int, rng: np.random.Generator, *, size: int, context: float, **kwargs) -> np.ndarray:
        """An augmented window of cell ``i`` (see :func:`augmented_window`)."""
        if self.sides is not None:
            kwargs = {"side_px": self.sides[i], "context_jitter": 1.18, **kwargs}
        return augmented_window(self._field(i), self.centres[i], self.diameters[i], rng,
                                size=size, context=context, **kwargs)


def group_balanced_weights(groups: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Sampling probabilities giving group ``g`` a share ∝ ``n_g ** (1 - power)``."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    w = counts[inverse].astype(float) ** -power
    return w / w.sum()


def coarse_accuracy(probs: np.ndarray, masks: np.ndarray) -> float:
    """Share of cells whose most probable *group* is their labelled one.

    The group probability is the sum over its classes; ``masks`` (n, 11) says
    which classes the labelled group allows, and a cell is right when that
    sum beats every other group's (:data:`~napari_hemato.train.data_coarse.GROUPS`).
    """
    all_masks = group_mask(list(GROUPS))  # (8, 11)
    group_p = probs @ all_masks.T.astype(probs.dtype)  # (n, 8)
    own = (probs * masks).sum(1)
    return float((own >= group_p.max(1) - 1e-9).mean()) if len(probs) else float("nan")


class CoarseCells(NamedTuple):
    """What :func:`load_coarse` returns."""

    train: FieldCells
    val: FieldCells
    weights: np.ndarray  #: sampling weights of the train cells (group-balanced)
    val_inputs: np.ndarray  #: runtime windows of the val cells


def load_coarse(labels: str | Path, images: str | Path | None, *, size: int, context: float,
                colour: str, scale=None) -> CoarseCells:
    """The train and val cells of a coarse-label CSV, for training (``scale``: see :class:`FieldCells`)."""
    if images is None:
        raise ValueError("coarse_labels needs coarse_images (the folder of its field images)")
    train = FieldCells(labels, images, split="train", scale=scale)
    val = FieldCells(labels, images, split="val", scale=scale)
    return CoarseCells(train, val, group_balanced_weights(train.groups),
                       runtime_inputs(val, size=size, context=context, colour=colour))
