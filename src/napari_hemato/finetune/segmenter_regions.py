"""A segmenter's corrections on its model grid, the pixels sampled from them, the folds they
are checked on, and the refit of the foreground and distance channels.

Shared by the nucleus and smear fine-tunes (:mod:`napari_hemato.finetune.nuclei`,
:mod:`napari_hemato.finetune.smear`): a corrected region is its labels, the model's
per-pixel features, the distance target and, for a model with class maps, the class of
every labelled pixel and the image the engine's stain rule looks at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.head import BinaryHead, fit_binary_head, sigmoid
from napari_hemato.finetune.segmenter_features import ROLES, SegmenterFeatures

#: pixels sampled per region and stratum (foreground, background band, far background)
PER_STRATUM = 6000
BAND_PX = 3  # the background band: this many model-grid px around an object
MIN_HELD_OUT_NUCLEI = 10  # fewer objects than this in all: nothing held out
MAX_FOLDS = 5  # several regions: each is held out once, in up to this many folds
#: held-out regions larger than this (model-grid px) are scored on their centre
MAX_HELD_OUT_PX = 2048 * 2048
DIST_FG_WEIGHT = 4.0  # training's distance loss weighs object pixels 1 + 4
#: the corrections' model-grid pixels read at most (their features are held in memory)
MAX_PIXELS = 36_000_000


@dataclass
class Region:
    """One corrected region on the model grid."""

    key: str
    labels: np.ndarray  # (H, W) int32
    features: np.ndarray  # (D, H, W) float32
    dist: np.ndarray | None  # (H, W) float32, the distance target (None: only scored)
    classes: np.ndarray | None = None  # (H, W) int8 class index of each pixel, -1 background
    image: np.ndarray | None = None  # (H, W, 3) uint8 (a stain rule reads it)
    ignore: np.ndarray | None = None  # (H, W) bool: objects of a class the model does not know

    def crop(self, sl: tuple[slice, slice], key: str) -> Region:
        def part(a):
            return None if a is None else a[sl]

        return Region(key, self.labels[sl], self.features[(slice(None), *sl)], part(self.dist),
                      part(self.classes), part(self.image), part(self.ignore))

    @property
    def nuclei(self) -> int:
        """Objects in the region (nuclei, cells)."""
        return int(len(np.unique(self.labels)) - (self.labels == 0).any())


@dataclass
class Samples:
    """Sampled pixels of corrections: features, targets and weights (summing to 1 per region)."""

    x: np.ndarray  # (n, D)
    fg: np.ndarray  # (n,) 0/1
    dist: np.ndarray  # (n,)
    weight: np.ndarray  # (n,)
    cls: np.ndarray  # (n,) class index, -1 for background or a model without classes

    @classmethod
    def merge(cls, parts: list[Samples], d: int) -> Samples:
        if not parts:
            return cls(np.zeros((0, d)), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("x", "fg", "dist", "weight", "cls")))


def export_paths(data: list[Path], what: str) -> list[Path]:
    """The instance exports in ``data`` (files, or folders of them); ``what`` names the objects
    in the error a folder without any gives."""
    from napari_hemato.core.export.regions import list_instance_exports

    paths: list[Path] = []
    for d in data:
        found = list_instance_exports(d) if d.is_dir() else [d]
        if not found:
            raise HematoError(f"{d}: no exported {what} (*_labels.tif, *.ome.zarr, *_coco.json, "
                              "*.geojson) to fine-tune on")
        paths += found
    return paths


def read_exports(paths: list[Path], feats: SegmenterFeatures, progress, *, span: float,
                 no_mpp_hint: str, budget_hint: str, pad_edges: bool = False):
    """Yield ``(exported region, image, labels, features)`` of each export in ``paths``: the
    image (H, W, 3) and labels (H, W) int32 resampled to the model's µm/px, the model's features
    of the image (:meth:`SegmenterFeatures.run`, ``pad_edges`` as it says).

    Progress runs from 0.05 over ``span``; an export without a pixel size is an error ending
    with ``no_mpp_hint``, corrections above :data:`MAX_PIXELS` model-grid pixels one ending
    with ``budget_hint``."""
    from napari_hemato.core.export.regions import load_instance_export
    from napari_hemato.core.resample import to_model_grid

    total = 0
    for k, path in enumerate(paths):
        fraction = 0.05 + span * k / len(paths)
        progress(f"reading the corrections {k + 1}/{len(paths)}", fraction)
        try:
            region = load_instance_export(path)
        except (ValueError, FileNotFoundError) as err:
            raise HematoError(str(err)) from None
        if not region.mpp:
            raise HematoError(f"{path}: the export has no pixel size; {no_mpp_hint}")
        image, labels = to_model_grid(region.image, region.labels.astype(np.int32), region.mpp, feats.spec.mpp)
        total += labels.size
        if total > MAX_PIXELS:
            raise HematoError(f"the corrections cover more than {MAX_PIXELS / 1e6:.0f} MP at the model's "
                              f"{feats.spec.mpp:g} µm/px; {budget_hint}")
        step = f"reading features {k + 1}/{len(paths)}"
        features = feats.run(image, lambda step=step, fraction=fraction: progress(step, fraction),
                             pad_edges=pad_edges)
        yield region, image, labels, features


class SampleCache:
    """Each region's sampled pixels, drawn once (seeded by the order regions are first met)."""

    def __init__(self, dim: int, per_stratum: int = PER_STRATUM) -> None:
        self.dim, self.per_stratum = dim, per_stratum
        self._drawn: dict[int, Samples] = {}

    def __call__(self, regions: list[Region]) -> Samples:
        for r in regions:
            if id(r) not in self._drawn:
                self._drawn[id(r)] = sample(r, np.random.default_rng(len(self._drawn)), self.per_stratum)
        return Samples.merge([self._drawn[id(r)] for r in regions], self.dim)


def sample(region: Region, rng: np.random.Generator, per_stratum: int = PER_STRATUM) -> Samples:
    """Up to ``per_stratum`` pixels of each stratum, weighted back to its share of the region
    (pixels of ignored objects are never sampled). The strata: the objects (with classes,
    the objects of each class: a platelet's few pixels are not outdrawn by the red cells'),
    the background band around them, the rest."""
    fg = region.labels > 0
    band = ndi.binary_dilation(fg, iterations=BAND_PX) & ~fg
    keep = np.ones_like(fg) if region.ignore is None else ~region.ignore
    if region.classes is None:
        objects = [fg & keep]
    else:
        objects = [(region.classes == c) & fg & keep for c in np.unique(region.classes[fg]) if c >= 0]
    parts = []
    for stratum in (*objects, band & keep, ~fg & ~band & keep):
        idx = np.flatnonzero(stratum)
        if not len(idx):
            continue
        pick = idx if len(idx) <= per_stratum else rng.choice(idx, per_stratum, replace=False)
        yy, xx = np.unravel_index(pick, fg.shape)
        cls = (np.full(len(pick), -1, np.int64) if region.classes is None
               else np.where(fg[yy, xx], region.classes[yy, xx], -1).astype(np.int64))
        parts.append(Samples(region.features[:, yy, xx].T.astype(np.float64), fg[yy, xx].astype(np.float64),
                             region.dist[yy, xx].astype(np.float64),
                             np.full(len(pick), len(idx) / fg.size / len(pick)), cls))
    return Samples.merge(parts, region.features.shape[0])


def folds(regions: list[Region], seed: int = 0) -> tuple[list[tuple[list[Region], list[Region]]], str]:
    """``([(fit regions, held-out regions), ...], how)``: with several regions, up to
    :data:`MAX_FOLDS` folds, each region held out once; with one, its last fifth along the
    longer side; with few objects, nothing held out (the fit is checked on itself)."""
    n = sum(r.nuclei for r in regions)
    if n < MIN_HELD_OUT_NUCLEI:
        return [(regions, regions)], f"none ({n} objects: checked on the fit itself)"
    if len(regions) >= 2:
        k = min(MAX_FOLDS, len(regions))
        order = np.random.default_rng(seed).permutation(len(regions))
        out = []
        for g in range(k):
            held = set(order[g::k].tolist())
            out.append(([r for i, r in enumerate(regions) if i not in held], [regions[i] for i in sorted(held)]))
        return out, f"{k} folds over {len(regions)} regions (each held out once)"
    r = regions[0]
    axis = int(r.labels.shape[1] > r.labels.shape[0])
    cut = int(round(0.8 * r.labels.shape[axis]))
    first, last = slice(0, cut), slice(cut, None)
    sls = ((first, slice(None)), (last, slice(None))) if axis == 0 else ((slice(None), first), (slice(None), last))
    return ([([r.crop(sls[0], f"{r.key}[fit]")], [r.crop(sls[1], f"{r.key}[held out]")])],
            f"the last fifth of the one region ({'rows' if axis == 0 else 'columns'})")


def centre(region: Region) -> Region:
    """``region``, or its centre when it is larger than :data:`MAX_HELD_OUT_PX`."""
    h, w = region.labels.shape
    if h * w <= MAX_HELD_OUT_PX:
        return region
    side = int(np.sqrt(MAX_HELD_OUT_PX))
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return region.crop((slice(y0, y0 + side), slice(x0, x0 + side)), f"{region.key}[centre]")


def fold_samples(regions: list[Region], dim: int, per_stratum: int = PER_STRATUM):
    """``(plan, how, everything, fold_sets)``: :func:`folds` with each held-out region cut to its
    :func:`centre`, the pixels sampled from all regions, and from each fold's fit regions (each
    region drawn once)."""
    plan, how = folds(regions)
    plan = [(fit_regions, [centre(r) for r in held]) for fit_regions, held in plan]
    samples = SampleCache(dim, per_stratum)
    return plan, how, samples(regions), [samples(fit_regions) for fit_regions, _ in plan]


def loss_weights(s: Samples, replay: dict, share: float) -> np.ndarray:
    """Each row's weight in a refit: the corrections ``share`` of it, the replay the rest
    (its rows weighted by ``train_w`` when the replay drew them by stratum)."""
    rw = replay.get("train_w")
    rw = np.full(len(replay["train_x"]), 1.0) if rw is None else np.asarray(rw, np.float64)
    return np.concatenate([share * s.weight / max(s.weight.sum(), 1e-12),
                           (1 - share) * rw / max(rw.sum(), 1e-12)])


def fit_maps(s: Samples, replay: dict, init: dict[str, BinaryHead], l2: float, share: float,
             offset: float) -> dict[str, BinaryHead]:
    """Both channels refit on the corrections (``share`` of the loss) and the replay."""
    rx = replay["train_x"]
    x = np.concatenate([s.x, rx])
    base = loss_weights(s, replay, share)
    own = {r: sigmoid(init[r].logits(rx) - (offset if r == "foreground" else 0.0)) for r in ROLES}
    fg_y = np.concatenate([s.fg, own["foreground"]])
    dist_y = np.concatenate([s.dist, own["distance"]])
    # training weighs object pixels 1 + 4 in the distance loss; the replay's object share is
    # the shipped head's own foreground probability
    dist_w = base * (1 + DIST_FG_WEIGHT * np.concatenate([s.fg, own["foreground"]]))
    return {"foreground": fit_binary_head(x, fg_y, init["foreground"], sample_weight=base, l2=l2, offset=offset),
            "distance": fit_binary_head(x, dist_y, init["distance"], sample_weight=dist_w, l2=l2)}
