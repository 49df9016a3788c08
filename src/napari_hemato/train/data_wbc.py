"""White-cell training data: listing, split, cell geometry cache, size-normalised samples.

Torch-free (numpy, pandas, Pillow), so :mod:`napari_hemato.train.evaluate_wbc`
can use it with onnxruntime only. Two layouts are read:

- one subfolder per class of single-cell images (the PBC layout:
  ``pbc/SNE/SNE_102049.jpg``);
- ``manifest.csv`` with columns ``path,class[,split][,slide][,diameter_px]``
  (paths relative to the folder), as written by the plugin's crops export.

Every image is normalised by its own cell's size with the runtime functions of
:mod:`napari_hemato.models.cell_classifier`, so training and inference see
the same crops.

Examples
--------
>>> df = list_samples("../shared/data/pbc")  # doctest: +SKIP
>>> df = assign_split(df, val_fraction=0.15, seed=0)  # doctest: +SKIP
>>> df.groupby("split").size()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.io.cell_images import (  # noqa: F401 - re-exported for the trainers
    IMAGE_SUFFIXES,
    MANIFEST,
    canonical_class,
    list_cell_images,
    load_rgb,
)
from napari_hemato.models.cell_classifier import (
    CLASS_NAMES,
    FALLBACK_FRACTION,
    normalize_cell,
    segment_center_cell,
)

log = logging.getLogger(__name__)

VAL_NAMES = {"val", "valid", "validation", "test", "holdout"}


def list_samples(data_dir: str | Path) -> pd.DataFrame:
    """Labelled cell images under ``data_dir`` (exact classes only; see
    :func:`napari_hemato.io.cell_images.list_cell_images`)."""
    return list_cell_images(data_dir, groups=False)


def assign_split(df: pd.DataFrame, *, val_fraction: float = 0.15, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Add a ``split`` column (``train`` / ``val``) and describe the rule used.

    Priority: a split given in the manifest (``val``/``valid``/``test`` ->
    val); else whole slides (seeded shuffle of slide names, slides added to
    val until ``val_fraction`` of the cells); else per class (seeded shuffle
    of each class's sorted paths, ``round(val_fraction * n)`` to val).

    Returns
    -------
    (DataFrame, str)
        Copy of ``df`` with ``split``; the rule in words.

    Examples
    --------
    >>> d = pd.DataFrame({"path": list("abcdefghij"), "class": ["SNE"] * 10, "split": None, "slide": None})
    >>> out, rule = assign_split(d, val_fraction=0.2, seed=0)
    >>> int((out["split"] == "val").sum())
    2
    """
    out = df.copy()
    given = out["split"].notna() if "split" in out else pd.Series(False, index=out.index)
    if given.any():
        out["split"] = ["val" if str(s).strip().lower() in VAL_NAMES else "train" for s in out["split"]]
        return out, "split column of manifest.csv (val/valid/validation/test -> val)"
    rng = np.random.default_rng(seed)
    slides = out["slide"] if "slide" in out else pd.Series(None, index=out.index)
    if slides.notna().all() and slides.nunique() > 1:
        names = np.array(sorted(slides.unique()))
        rng.shuffle(names)
        counts = slides.value_counts()
        val, n = set(), 0
        for s in names:
            if n >= val_fraction * len(out) or len(val) == len(names) - 1:
                break
            val.add(s)
            n += int(counts[s])
        out["split"] = ["val" if s in val else "train" for s in slides]
        return out, f"whole slides, seeded shuffle (seed {seed}) until {val_fraction:.0%} of cells"
    split = pd.Series("train", index=out.index, dtype=object)
    for _, group in out.groupby("class", sort=True):
        idx = np.asarray(group.sort_values("path").index)
        perm = rng.permutation(len(idx))
        k = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        split.loc[idx[perm[:k]]] = "val"
    out["split"] = split
    rule = (f"stratified by class: per class (sorted), numpy default_rng({seed}).permutation, "
            f"first round({val_fraction} * n) to val")
    return out, rule


def cell_geometry(image: np.ndarray, diameter_px: float | None = None) -> tuple[float, float, float, bool]:
    """``(diameter, cy, cx, segmented)`` of the cell in a single-cell image.

    A given ``diameter_px`` wins; the centre is then the image centre.
    Otherwise :func:`segment_center_cell` is used, with the runtime fallback
    (``0.45 * min(h, w)`` at the image centre) when it fails.

    Examples
    --------
    >>> cell_geometry(np.full((50, 60, 3), 255, np.uint8))
    (22.5, 24.5, 29.5, False)
    """
    h, w = image.shape[:2]
    if diameter_px is not None and np.isfinite(diameter_px) and diameter_px > 0:
        return float(diameter_px), (h - 1) / 2, (w - 1) / 2, False
    found = segment_center_cell(image)
    if found is None:
        return FALLBACK_FRACTION * min(h, w), (h - 1) / 2, (w - 1) / 2, False
    d, (cy, cx) = found
    return d, cy, cx, True


class CellImages:
    """All images of a sample table in memory, with their cell geometry.

    Parameters
    ----------
    df : DataFrame
        From :func:`list_samples` (+ :func:`assign_split`).
    root : path
        Folder the ``path`` column is relative to.
    cache : path, optional
        CSV caching the geometry (diameter, centre) by path.

    Examples
    --------
    >>> data = CellImages(df, "../shared/data/pbc")  # doctest: +SKIP
    >>> x = data.sample(0, np.random.default_rng(0), size=128, context=1.5)  # doctest: +SKIP
    """

    def __init__(self, df: pd.DataFrame, root: str | Path, *, cache: str | Path | None = None) -> None:
        self.df = df.reset_index(drop=True)
        self.root = Path(root)
        self.images = [load_rgb(self.root / p) for p in self.df["path"]]
        geo = None
        if cache is not None and Path(cache).is_file():
            old = pd.read_csv(cache).set_index("path")
            if set(self.df["path"]) <= set(old.index):
                geo = old.loc[self.df["path"], ["diameter", "cy", "cx", "segmented"]].to_numpy()
        if geo is None:
            diam = self.df["diameter_px"].to_numpy(float).copy()
            side = self.df["crop_side"].to_numpy(float) if "crop_side" in self.df else np.full(len(diam), np.nan)
            for k, img in enumerate(self.images):  # level-0 diameters -> pixels of the (resized) crop
                if np.isfinite(side[k]) and side[k] > 0:
                    diam[k] *= img.shape[1] / side[k]
            rows = [cell_geometry(img, d) for img, d in zip(self.images, diam, strict=True)]
            geo = np.asarray(rows, dtype=float)
            if cache is not None:
                pd.DataFrame({"path": self.df["path"], "diameter": geo[:, 0], "cy": geo[:, 1],
                              "cx": geo[:, 2], "segmented": geo[:, 3].astype(bool)}).to_csv(cache, index=False)
        self.diameter, self.cy, self.cx = geo[:, 0].astype(float), geo[:, 1].astype(float), geo[:, 2].astype(float)
        self.segmented = geo[:, 3].astype(bool)
        self.labels = self.df["label"].to_numpy(int)
        self.runtime_side: np.ndarray | None = None  # red-cell scale: windows (px), set_scale
        self.train_side: np.ndarray | None = None
        self.side_jitter = 1.18
        if (~self.segmented).any():
            log.info("%d of %d images: no cell segmented, fallback diameter used",
                     int((~self.segmented).sum()), len(self.df))

    def __len__(self) -> int:
        return len(self.images)

    def set_scale(self, scale, *, cache: str | Path | None = None, train_mpp: float | None = None) -> None:
        """Physical windows (red-cell scale, :class:`~napari_hemato.models.window_scale.WindowScale`).

        ``runtime_side``: what the runtime cuts for each image (the red-cell
        ruler on the crop, the cell's own size where it fails); ``train_side``:
        ``window_um / train_mpp`` for every image (one scanner: the training
        images' pooled pixel size), or the runtime sides when ``train_mpp`` is None.
        The ruler's readings are cached in ``cache`` (CSV by path).
        """
        if scale.mode == "self":
            self.runtime_side = self.train_side = None
            return
        self.ruler_mpp = ruler_readings(self.images, self.df["path"], self.diameter, scale, cache=cache)
        self.runtime_side = np.array([scale.side_from_mpp(m) if np.isfinite(m) else d * scale.context
                                      for m, d in zip(self.ruler_mpp, self.diameter, strict=True)])
        self.train_side = (self.runtime_side if train_mpp is None
                           else np.full(len(self), scale.side_from_mpp(train_mpp)))

    def runtime_input(self, i: int, *, size: int, context: float) -> np.ndarray:
        """The exact input the runtime builds for image ``i`` (crop centre, estimated diameter)."""
        img = self.images[i]
        h, w = img.shape[:2]
        side = None if self.runtime_side is None else self.runtime_side[i]
        return normalize_cell(img, ((h - 1) / 2, (w - 1) / 2), self.diameter[i], context=context, size=size,
                              side_px=side)[0]

    def sample(self, i: int, rng: np.random.Generator, *, size: int, context: float, **kwargs) -> np.ndarray:
        """A geometrically augmented, size-normalised (size, size, 3) uint8 crop of image ``i``.

        The centre is the segmented centroid or the image centre (half each);
        see :func:`augmented_window` for the rest.
        """
        img = self.images[i]
        h, w = img.shape[:2]
        if self.segmented[i] and rng.random() < 0.5:
            cy, cx = self.cy[i], self.cx[i]
        else:
            cy, cx = (h - 1) / 2, (w - 1) / 2
        if self.train_side is not None:
            kwargs = {"side_px": self.train_side[i], "context_jitter": self.side_jitter, **kwargs}
        return augmented_window(img, (cy, cx), self.diameter[i], rng, size=size, context=context,
                                **kwargs)


def ruler_readings(images, paths, diameters, scale, *, cache=None) -> np.ndarray:
    """µm/px of each single-cell image by the red-cell ruler (nan where it fails), cached by path."""
    paths = list(paths)
    if cache is not None and Path(cache).is_file():
        old = pd.read_csv(cache).set_index("path")
        if set(paths) <= set(old.index) and float(old["rbc_um"].iloc[0]) == scale.rbc_um:
            return old.loc[paths, "mpp"].to_numpy(float)
    readings = scale.crop_readings(list(zip(images, diameters, strict=True)))
    mpp = np.array([np.nan if m is None else m for m in readings], float)
    log.info("red-cell ruler: %d of %d images measured, median %.4f µm/px", int(np.isfinite(mpp).sum()),
             len(mpp), float(np.nanmedian(mpp)) if np.isfinite(mpp).any() else float("nan"))
    if cache is not None:
        pd.DataFrame({"path": paths, "mpp": mpp, "rbc_um": scale.rbc_um}).to_csv(cache, index=False)
    return mpp


def augmented_window(
    image: np.ndarray,
    center_yx,
    diameter: float,
    rng: np.random.Generator,
    *,
    size: int,
    context: float,
    context_jitter: float = 1.25,
    shift: float = 0.06,
    p_lowres: float = 0.2,
    side_px: float | None = None,
) -> np.ndarray:
    """A size-normalised window around a cell with geometric augmentation.

    Context factor times ``exp(U(-ln j, ln j))`` (``j = context_jitter``),
    centre plus a gaussian shift of ``shift`` x window side, rot90 / flip, and
    with probability ``p_lowres`` a down-up resampling (0.45-0.9x) that mimics
    lower-resolution sources. A given ``side_px`` (red-cell scale) replaces
    ``diameter * context`` and takes the same jitter.

    Examples
    --------
    >>> img = np.full((60, 60, 3), 200, np.uint8)
    >>> augmented_window(img, (30, 30), 20.0, np.random.default_rng(0), size=32, context=1.5).shape
    (32, 32, 3)
    """
    from PIL import Image

    ctx = context * math.exp(rng.uniform(-math.log(context_jitter), math.log(context_jitter)))
    side = diameter * ctx if side_px is None else side_px * ctx / context
    dy, dx = np.clip(rng.normal(0, shift * side, 2), -2.5 * shift * side, 2.5 * shift * side)
    cy, cx = center_yx
    x, _ = normalize_cell(image, (cy + dy, cx + dx), diameter, context=ctx, size=size,
                          side_px=None if side_px is None else side)
    x = np.rot90(x, int(rng.integers(4)))
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < p_lowres:
        small = max(8, int(round(size * rng.uniform(0.45, 0.9))))
        im = Image.fromarray(np.ascontiguousarray(x))
        im = im.resize((small, small), Image.Resampling.BILINEAR)
        x = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(x)


def balanced_weights(labels: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-sample sampling probabilities giving class ``c`` a share ∝ ``n_c ** (1 - power)``.

    ``power=1`` is fully class-balanced, ``0`` the natural frequencies.

    Examples
    --------
    >>> balanced_weights(np.array([0, 0, 0, 0, 1]), power=1.0).round(3).tolist()
    [0.125, 0.125, 0.125, 0.125, 0.5]
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    w = counts[labels].astype(float) ** -power
    return w / w.sum()


def load_split(data_dir: Path, out_dir: Path, *, val_fraction: float, seed: int, scale=None):
    """``(train_df, val_df, rule, train, val)``: the split and its :class:`CellImages` (val: None
    when empty); the cell geometry is cached in ``out_dir/geometry_{train,val}.csv``.

    With a red-cell ``scale`` (:class:`~napari_hemato.models.window_scale.WindowScale`) the
    ruler reads every image (cached in ``out_dir/ruler_{train,val}.csv``); training windows use
    the median training reading (``train.pooled_mpp``), validation windows the runtime's;
    ``scale.context`` (the runtime's fallback when the ruler fails) becomes ``window_um`` / the
    training cells' median diameter in µm.
    """
    import time

    df, rule = assign_split(list_samples(data_dir), val_fraction=val_fraction, seed=seed)
    tr_df = df[df["split"] == "train"].reset_index(drop=True)
    va_df = df[df["split"] == "val"].reset_index(drop=True)
    log.info("data %s: %d train, %d val images (%s)", data_dir, len(tr_df), len(va_df), rule)
    per_class = tr_df["class"].value_counts().reindex(CLASS_NAMES).fillna(0).astype(int)
    log.info("train per class: %s", ", ".join(f"{k} {v}" for k, v in per_class.items()))
    t0 = time.perf_counter()
    train = CellImages(tr_df, data_dir, cache=out_dir / "geometry_train.csv")
    val = CellImages(va_df, data_dir, cache=out_dir / "geometry_val.csv") if len(va_df) else None
    log.info("loaded images and cell geometry in %.0f s", time.perf_counter() - t0)
    train.pooled_mpp = None
    if scale is not None and scale.mode != "self":
        readings = ruler_readings(train.images, tr_df["path"], train.diameter, scale,
                                  cache=out_dir / "ruler_train.csv")
        if not np.isfinite(readings).any():
            raise ValueError(f"{data_dir}: the red-cell ruler measured no training image")
        train.pooled_mpp = float(np.nanmedian(readings))
        cell_um = float(np.median(train.diameter[train.segmented])) * train.pooled_mpp
        scale.context = round(float(scale.window_um) / cell_um, 3)  # the fallback: same mean zoom
        train.set_scale(scale, cache=out_dir / "ruler_train.csv", train_mpp=train.pooled_mpp)
        if val is not None:
            val.set_scale(scale, cache=out_dir / "ruler_val.csv")
        log.info("red-cell scale: training windows at %.4f µm/px (median ruler), %.0f px; %.1f %% of "
                 "training images not measured", train.pooled_mpp, train.train_side[0],
                 100 * float((~np.isfinite(readings)).mean()))
    return tr_df, va_df, rule, train, val


def runtime_inputs(cells, *, size: int, context: float, colour: str) -> np.ndarray:
    """uint8 (n, size, size, 3) runtime windows of every cell of ``cells`` (anything with
    ``runtime_input``), colour-standardised as the runtime does (``colour``)."""
    from napari_hemato.models.colour_standardize import apply_colour_mode

    n = 0 if cells is None else len(cells)
    x = np.stack([cells.runtime_input(i, size=size, context=context) for i in range(n)]) if n else \
        np.zeros((0, size, size, 3), np.uint8)
    return apply_colour_mode(x, colour)

