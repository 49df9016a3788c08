"""Labelled single-cell images on disk: class folders, or the crops export's ``manifest.csv``.

What ``napari-hemato train wbc`` and ``napari-hemato finetune wbc`` read (no torch):

- one subfolder per class of single-cell images (the PBC layout:
  ``pbc/SNE/SNE_102049.jpg``); with ``groups=True`` a folder may also be a
  coarse group (``NEU``, ``LY``, ``MO``, ``EO``, ``BA``, ``IG``: any of its members);
- ``manifest.csv`` with columns ``path,class[,split][,slide][,diameter_px]``
  (paths relative to the folder), as written by the plugin's crops export; its
  ``reviewed`` / ``provenance`` columns are kept (a correction is a reviewed row).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.classes import WBC_GROUPS
from napari_hemato.models.cell_classifier import CLASS_NAMES

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_ALIASES = {"PLATELET": "PLT", "PLATELETS": "PLT", "NEUTROPHIL": "NEU", "NEUTROPHILS": "NEU",
            "LYMPHOCYTE": "LY", "LYMPHOCYTES": "LY", "MONOCYTE": "MO", "MONOCYTES": "MO",
            "EOSINOPHIL": "EO", "EOSINOPHILS": "EO", "BASOPHIL": "BA", "BASOPHILS": "BA"}


def canonical_class(name, *, groups: bool = False) -> str | None:
    """Class name in :data:`CLASS_NAMES` (or, with ``groups``, a coarse group) for a label.

    Examples
    --------
    >>> canonical_class("sne"), canonical_class("Platelet"), canonical_class("RBC")
    ('SNE', 'PLT', None)
    >>> canonical_class("Neutrophil", groups=True), canonical_class("neu")
    ('NEU', None)
    """
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return None
    key = str(name).strip().upper()
    key = _ALIASES.get(key, key)
    if key in CLASS_NAMES or (groups and key in WBC_GROUPS):
        return key
    return None


def list_cell_images(data_dir: str | Path, *, groups: bool = False) -> pd.DataFrame:
    """List labelled cell images under ``data_dir`` (class folders or ``manifest.csv``).

    Returns
    -------
    DataFrame
        ``path`` (relative to ``data_dir``, POSIX), ``class``, ``label`` (index in
        :data:`CLASS_NAMES`; -1 for a coarse group), ``split`` (given split or
        None), ``slide`` (or None), ``diameter_px`` (given, or from ``area_px``, else
        NaN), ``crop_side`` (the crop's side in the pixels ``diameter_px`` is measured
        in, from ``crop_x0/x1``, else NaN), ``reviewed`` and ``provenance`` (None when
        the layout has none); sorted by path.

    Examples
    --------
    >>> list_cell_images("../shared/data/pbc")["class"].value_counts()["PMY"]  # doctest: +SKIP
    492
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    known = ", ".join(CLASS_NAMES) + (f" or a group ({', '.join(WBC_GROUPS)})" if groups else "")
    if (root / MANIFEST).is_file():
        raw = pd.read_csv(root / MANIFEST)
        missing = {"path", "class"} - set(raw.columns)
        if missing:
            raise ValueError(f"{root / MANIFEST}: missing column(s) {sorted(missing)}")
        df = pd.DataFrame({"path": raw["path"].astype(str).str.replace("\\", "/", regex=False)})
        df["class"] = [canonical_class(c, groups=groups) for c in raw["class"]]
        for col in ("split", "slide", "provenance"):
            df[col] = raw[col].astype(object).where(raw[col].notna(), None) if col in raw else None
        df["reviewed"] = (raw["reviewed"].astype(str).str.lower().isin(["true", "1", "yes"])
                          if "reviewed" in raw else None)
        df["diameter_px"] = pd.to_numeric(raw["diameter_px"], errors="coerce") if "diameter_px" in raw else np.nan
        if "area_px" in raw:  # the plugin's export: segmented area in level-0 pixels
            from_area = 2.0 * np.sqrt(pd.to_numeric(raw["area_px"], errors="coerce").clip(lower=1.0) / np.pi)
            df["diameter_px"] = df["diameter_px"].fillna(from_area)
        if {"crop_x0", "crop_x1"} <= set(raw.columns):  # diameters are in level-0 pixels
            df["crop_side"] = pd.to_numeric(raw["crop_x1"], errors="coerce") - pd.to_numeric(raw["crop_x0"], errors="coerce")
        skipped = df["class"].isna()
        if skipped.any():
            log.warning("%s: skipping %d row(s) whose class is not %s (%s)", root / MANIFEST,
                        int(skipped.sum()), known,
                        ", ".join(sorted({str(c) for c in raw.loc[skipped, "class"]})[:8]))
        df = df[~skipped]
        absent = [p for p in df["path"] if not (root / p).is_file()]
        if absent:
            raise FileNotFoundError(f"{root / MANIFEST}: {len(absent)} listed image(s) missing, e.g. {absent[0]}")
    else:
        rows = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            cls = canonical_class(sub.name, groups=groups)
            if cls is None:
                log.warning("%s: folder %s is not %s; skipped", root, sub.name, known)
                continue
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append((f"{sub.name}/{f.name}", cls))
        df = pd.DataFrame(rows, columns=["path", "class"])
        df["split"], df["slide"], df["diameter_px"] = None, None, np.nan
        df["provenance"], df["reviewed"] = None, None
    if "crop_side" not in df:
        df["crop_side"] = np.nan
    if df.empty:
        raise ValueError(f"{root}: no labelled cell images found (class folders named {known}, "
                         f"or {MANIFEST})")
    df["label"] = [CLASS_NAMES.index(c) if c in CLASS_NAMES else -1 for c in df["class"]]
    df = df.sort_values("path").reset_index(drop=True)
    return df[["path", "class", "label", "split", "slide", "diameter_px", "crop_side",
               "reviewed", "provenance"]]


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Examples
    --------
    >>> load_rgb("../shared/data/pbc/SNE/SNE_102049.jpg").shape  # doctest: +SKIP
    (180, 182, 3)
    """
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
