"""Corrected points (a points CSV export) and the image each belongs to.

``napari-hemato finetune mitosis --data DATA`` takes points CSV exports
(``<name>_points.csv``: ``y_px, x_px, class, provenance, reviewed``, level-0 pixels) or
folders holding them. Each needs its image, looked up, in order:

1. the ``image_path`` recorded in ``<name>_points.json`` beside the CSV (what the mitosis
   task's :meth:`~napari_hemato.tasks.mitosis.MitosisTask.export_corrections` writes, with
   the pixel size and the region analysed),
2. a file of that name beside the CSV,
3. ``<name>.<image suffix>`` beside the CSV,
4. the only image in the CSV's folder.

What a row teaches: a **positive** is a figure the user kept (a model class, reviewed)
or added or re-classed (provenance ``manual`` / ``corrected``); a **negative** is a point
the user rejected (class ``rejected``); unreviewed model calls teach nothing (and no
background is sampled near them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.classes import REJECTED, UNASSIGNED
from napari_hemato.core.errors import HematoError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".svs", ".ndpi", ".mrxs", ".scn")
CSV_SUFFIX = "points.csv"


@dataclass
class CorrectedImage:
    """The corrected points of one image, in its level-0 pixels."""

    csv: Path
    image: Path
    mpp: float | None  # level-0 µm/px (None: the image file's own, or the model's assumption)
    positives: np.ndarray  # (p, 2) y, x
    negatives: np.ndarray  # (q, 2)
    others: np.ndarray  # (r, 2) unreviewed calls: neither, and no background near them
    region: tuple[int, int, int, int] | None = None
    labels: dict[str, int] = field(default_factory=dict)  # counts per class (the card)


def list_points_csvs(data: str | Path) -> list[Path]:
    data = Path(data)
    if data.is_file():
        return [data]
    if data.is_dir():
        return sorted(p for p in data.iterdir() if p.is_file() and p.name.endswith(CSV_SUFFIX))
    raise HematoError(f"{data}: no such file or folder")


def _sidecar(csv: Path) -> dict:
    side = csv.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        head = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise HematoError(f"{side}: not readable JSON ({exc})") from None
    return head if isinstance(head, dict) else {}


def find_image(csv: Path, recorded: str | None) -> Path:
    """The image ``csv``'s points were drawn on (see module docstring)."""
    candidates = []
    if recorded:
        candidates += [Path(recorded), csv.parent / Path(recorded).name]
    stem = csv.name[: -len(CSV_SUFFIX)].rstrip("._-")
    images = sorted(p for p in csv.parent.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    candidates += [p for p in images if stem and p.stem == stem]
    if len(images) == 1:
        candidates.append(images[0])
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates) or f"no image in {csv.parent}"
    raise HematoError(f"{csv}: cannot find the image its points were drawn on (tried {tried}); "
                      "put the image beside the CSV")


def _truthy(col: pd.Series) -> np.ndarray:
    return col.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes")).to_numpy(bool)


def read_points_corrections(csv: Path, class_names) -> CorrectedImage:
    """One points CSV export as positives, negatives and the rest (see module docstring)."""
    from napari_hemato.core.export import import_points_csv

    head = _sidecar(csv)
    ann = import_points_csv(csv, mpp=head.get("mpp"))
    table = ann.table
    image = find_image(csv, head.get("image_path"))
    if not len(table):
        return CorrectedImage(csv, image, ann.mpp, *(np.zeros((0, 2)),) * 3)
    cls = table["class"].astype(str).to_numpy() if "class" in table else np.full(len(table), UNASSIGNED)
    prov = table["provenance"].astype(str).to_numpy() if "provenance" in table else np.full(len(table), "")
    reviewed = _truthy(table["reviewed"]) if "reviewed" in table else np.zeros(len(table), bool)
    yx = table[["y", "x"]].to_numpy(np.float64)
    changed = np.isin(prov, ["manual", "corrected"])
    neg = cls == REJECTED
    pos = ~neg & np.isin(cls, list(class_names)) & (reviewed | changed)
    region = head.get("region")
    labels = {k: int(v) for k, v in zip(*np.unique(cls[pos | neg], return_counts=True), strict=True)}
    return CorrectedImage(csv, image, ann.mpp, yx[pos], yx[neg], yx[~pos & ~neg],
                          tuple(int(v) for v in region) if region else None, labels)


def read_corrections(data: list[str | Path], class_names) -> list[CorrectedImage]:
    """Every corrected image in ``data`` (files or folders); a clear error if none."""
    out = []
    for item in data:
        csvs = list_points_csvs(item)
        if not csvs:
            raise HematoError(f"{item}: no points CSV (*{CSV_SUFFIX}): export the reviewed "
                              "mitoses as points CSV (beside the image)")
        out += [read_points_corrections(c, class_names) for c in csvs]
    if not any(len(c.positives) + len(c.negatives) for c in out):
        raise HematoError(f"{', '.join(str(d) for d in data)}: no corrected points (review the "
                          "detections: accept, reject or add some, then export them)")
    return out
