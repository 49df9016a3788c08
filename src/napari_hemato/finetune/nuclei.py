"""Fine-tune the nucleus segmenter on a user's corrected masks, without torch.

1. Read the corrections: the plugin's instance exports (label TIFF, OME-Zarr, COCO,
   GeoJSON) with their images (:mod:`napari_hemato.core.export.regions`). An exported
   region is taken as reviewed: every nucleus as drawn, every other pixel background.
2. Resample each region to the model's µm/px and run the model on it for its per-pixel
   features (the input of the 1×1 convolution its ``foreground`` and ``distance`` maps come
   from; :mod:`napari_hemato.finetune.segmenter_features`). Targets: ``labels > 0`` and
   :func:`~napari_hemato.core.postprocess.distance_target`, as in training.
3. Refit both channels of that convolution (per-pixel logistic regressions; the distance
   with its target as a soft label, weighted like training), anchored to the shipped
   weights, on pixels sampled from the corrections (foreground, the background band
   around nuclei, the rest; weighted back to their true shares) plus the model's replay
   (reference training pixels' features with the shipped head's own values as labels, so
   that without corrections the optimum is the shipped head). The anchor and the
   corrections' share are chosen on held-out corrections (with several regions, up to 5 folds,
   each region held out once; with one, its last fifth) by (F1@0.5 + AJI) / 2 after the
   model's own post-processing, among the settings that keep the reference F1 and AJI within
   a point (measured on crops of the base model's validation images, shipped as features and
   labels in the replay).
4. Write both channels into a copy of the ONNX graph, and of the int8 one when the base has it
   (quantization keeps that convolution float): an ordinary model folder for
   ``analyze --task nuclei --model``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.core.errors import HematoError
from napari_hemato.core.metrics import (
    aggregated_jaccard_index,
    match_instances,
    mean_average_precision,
)
from napari_hemato.core.postprocess import distance_target, postprocess_instances
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.common import FinetuneResult, Progress, begin, finish, search_settings
from napari_hemato.finetune.head import BinaryHead, fit_binary_head, sigmoid
from napari_hemato.finetune.nuclei_card import card
from napari_hemato.finetune.pixels_replay import load_pixels_replay, val_crops
from napari_hemato.finetune.segmenter_features import ROLES, SegmenterFeatures

log = logging.getLogger(__name__)

#: (anchor l2, corrections' share of the loss) tried, most conservative first
SETTINGS = [(l2, share) for l2 in (10.0, 3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2) for share in (0.2, 0.5, 0.8)]
MAX_REFERENCE_DROP = 0.01
#: pixels sampled per region and stratum (foreground, background band, far background)
PER_STRATUM = 6000
BAND_PX = 3  # the background band: this many model-grid px around a nucleus
MIN_HELD_OUT_NUCLEI = 10  # fewer nuclei than this in all: nothing held out
MAX_FOLDS = 5  # several regions: each is held out once, in up to this many folds
#: held-out regions larger than this (model-grid px) are scored on their centre
MAX_HELD_OUT_PX = 2048 * 2048
#: the corrections' model-grid pixels read at most (their features are held in memory)
MAX_PIXELS = 36_000_000
DIST_FG_WEIGHT = 4.0  # training's distance loss weighs nucleus pixels 1 + 4


@dataclass
class Region:
    """One corrected region on the model grid."""

    key: str
    labels: np.ndarray  # (H, W) int32
    features: np.ndarray  # (D, H, W) float32
    dist: np.ndarray | None  # (H, W) float32, the distance target (None: only scored)

    def crop(self, sl: tuple[slice, slice], key: str) -> Region:
        return Region(key, self.labels[sl], self.features[(slice(None), *sl)],
                      None if self.dist is None else self.dist[sl])

    @property
    def nuclei(self) -> int:
        return int(len(np.unique(self.labels)) - (self.labels == 0).any())


@dataclass
class Samples:
    """Sampled pixels of corrections: features, targets and weights (summing to 1 per region)."""

    x: np.ndarray  # (n, D)
    fg: np.ndarray  # (n,) 0/1
    dist: np.ndarray  # (n,)
    weight: np.ndarray  # (n,)

    @classmethod
    def merge(cls, parts: list[Samples], d: int) -> Samples:
        if not parts:
            return cls(np.zeros((0, d)), np.zeros(0), np.zeros(0), np.zeros(0))
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("x", "fg", "dist", "weight")))


def read_regions(data: list[Path], feats: SegmenterFeatures, progress: Progress) -> list[Region]:
    """Every instance export in ``data`` (files or folders) on the model grid, with its features."""
    from napari_hemato.core.export.regions import list_instance_exports, load_instance_export
    from napari_hemato.core.resample import to_model_grid

    paths: list[Path] = []
    for d in data:
        found = list_instance_exports(d) if d.is_dir() else [d]
        if not found:
            raise HematoError(f"{d}: no exported masks (*_labels.tif, *.ome.zarr, *_coco.json, "
                              "*.geojson) to fine-tune on")
        paths += found
    regions, total = [], 0
    for k, path in enumerate(paths):
        progress(f"reading the corrections {k + 1}/{len(paths)}", 0.05 + 0.4 * k / len(paths))
        try:
            region = load_instance_export(path)
        except (ValueError, FileNotFoundError) as err:
            raise HematoError(str(err)) from None
        if not region.mpp:
            raise HematoError(f"{path}: the export has no pixel size; re-export it from an image "
                              "whose µm/px is known (or typed in the Analyse widget)")
        image, labels = to_model_grid(region.image, region.labels.astype(np.int32), region.mpp,
                                      feats.spec.mpp)
        total += labels.size
        if total > MAX_PIXELS:
            raise HematoError(f"the corrections cover more than {MAX_PIXELS / 1e6:.0f} MP at the model's "
                              f"{feats.spec.mpp:g} µm/px; export the regions you reviewed, not the whole slide")
        step, fraction = f"reading features {k + 1}/{len(paths)}", 0.05 + 0.4 * k / len(paths)
        features = feats.run(image, cancel=lambda step=step, fraction=fraction: progress(step, fraction))
        regions.append(Region(region.key, labels, features, distance_target(labels)))
        log.info("%s: %d nuclei, %d×%d px on the model grid", region.key, regions[-1].nuclei, *labels.shape)
    return regions


def sample(region: Region, rng: np.random.Generator) -> Samples:
    """Up to :data:`PER_STRATUM` pixels of each stratum, weighted back to its share of the region."""
    fg = region.labels > 0
    band = ndi.binary_dilation(fg, iterations=BAND_PX) & ~fg
    parts = []
    for stratum in (fg, band, ~fg & ~band):
        idx = np.flatnonzero(stratum)
        if not len(idx):
            continue
        pick = idx if len(idx) <= PER_STRATUM else rng.choice(idx, PER_STRATUM, replace=False)
        yy, xx = np.unravel_index(pick, fg.shape)
        parts.append(Samples(region.features[:, yy, xx].T.astype(np.float64), fg[yy, xx].astype(np.float64),
                             region.dist[yy, xx].astype(np.float64),
                             np.full(len(pick), len(idx) / fg.size / len(pick))))
    return Samples.merge(parts, region.features.shape[0])


def folds(regions: list[Region], seed: int = 0) -> tuple[list[tuple[list[Region], list[Region]]], str]:
    """``([(fit regions, held-out regions), ...], how)``: with several regions, up to
    :data:`MAX_FOLDS` folds, each region held out once; with one, its last fifth along the
    longer side; with few nuclei, nothing held out (the fit is checked on itself)."""
    n = sum(r.nuclei for r in regions)
    if n < MIN_HELD_OUT_NUCLEI:
        return [(regions, regions)], f"none ({n} nuclei: checked on the fit itself)"
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


def _centre(region: Region) -> Region:
    h, w = region.labels.shape
    if h * w <= MAX_HELD_OUT_PX:
        return region
    side = int(np.sqrt(MAX_HELD_OUT_PX))
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return region.crop((slice(y0, y0 + side), slice(x0, x0 + side)), f"{region.key}[centre]")


def object_scores(pairs: list[tuple[dict[str, BinaryHead], list[Region]]], spec, *,
                  with_map: bool = False) -> dict:
    """Pooled F1@0.5, mean AJI (and mean mAP 0.5:0.95) after post-processing of each
    ``(heads, regions)`` pair's regions by its heads, and the F1 of the weakest region
    (``worst_f1``)."""
    tp = fp = fn = 0
    ajis, maps, f1s = [], [], []
    for heads, regions in pairs:
        for r in regions:
            fgm, dist = SegmenterFeatures.maps(r.features, heads)
            pred = postprocess_instances(spec.postprocess, spec.mpp, fgm, dist)
            m = match_instances(r.labels, pred)
            tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
            f1s.append(2 * m.tp / max(2 * m.tp + m.fp + m.fn, 1))
            ajis.append(aggregated_jaccard_index(r.labels, pred))
            if with_map:
                maps.append(mean_average_precision(r.labels, pred))
    if not f1s:
        return {"f1": float("nan"), "aji": float("nan"), "score": float("nan"), "worst_f1": float("nan")}
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    out = {"f1": f1, "aji": float(np.mean(ajis)), "score": 0.5 * (f1 + float(np.mean(ajis))),
           "worst_f1": float(min(f1s))}
    if with_map:
        out["map"] = float(np.mean(maps))
    return out


def reference_regions(replay: dict) -> list[Region]:
    """The replay's reference validation crops as regions (features and true labels)."""
    return [Region(f"reference/{k}", lab, f, None) for k, (f, lab) in enumerate(val_crops(replay))]


def reference_scores(heads: dict[str, BinaryHead], reference: list[Region], spec) -> dict:
    """F1@0.5 and AJI on the reference validation crops, post-processed as shipped, and the F1
    of the weakest crop (reported, not a condition: one crop holds a few dozen nuclei)."""
    s = object_scores([(heads, reference)], spec)
    return {"reference_f1": s["f1"], "reference_aji": s["aji"], "reference_worst_crop_f1": s["worst_f1"]}


def keeps_reference(row: dict, before: dict) -> bool:
    return all(row[k] >= before[k] - MAX_REFERENCE_DROP for k in ("reference_f1", "reference_aji"))


def fit(s: Samples, replay: dict, init: dict[str, BinaryHead], l2: float, share: float,
        offset: float) -> dict[str, BinaryHead]:
    """Both channels refit on the corrections (``share`` of the loss) and the replay."""
    rx = replay["train_x"]
    x = np.concatenate([s.x, rx])
    base = np.concatenate([share * s.weight / max(s.weight.sum(), 1e-12),
                           np.full(len(rx), (1 - share) / max(len(rx), 1))])
    own = {r: sigmoid(init[r].logits(rx) - (offset if r == "foreground" else 0.0)) for r in ROLES}
    fg_y = np.concatenate([s.fg, own["foreground"]])
    dist_y = np.concatenate([s.dist, own["distance"]])
    # training weighs nucleus pixels 1 + 4 in the distance loss; the replay's nucleus share is
    # the shipped head's own foreground probability
    dist_w = base * (1 + DIST_FG_WEIGHT * np.concatenate([s.fg, own["foreground"]]))
    return {"foreground": fit_binary_head(x, fg_y, init["foreground"], sample_weight=base, l2=l2, offset=offset),
            "distance": fit_binary_head(x, dist_y, init["distance"], sample_weight=dist_w, l2=l2)}


def finetune_nuclei(data: list[str | Path], out: str | Path, *, base: str | Path | None = None,
                    max_minutes: float = 2.0, progress: Progress | None = None, overwrite: bool = False,
                    threads: int | None = None) -> FinetuneResult:
    """Fine-tune the nucleus segmenter ``base`` (default: bundled) on corrected masks in ``data``.

    ``data``: instance exports (files, or folders of them) with their images; the steps are
    the module's, the keywords :func:`napari_hemato.api.finetune`'s.

    Examples
    --------
    >>> finetune_nuclei(["exports/"], "my_nuclei_model")  # doctest: +SKIP
    FinetuneResult(folder=PosixPath('my_nuclei_model'), ...)
    """
    progress, base_folder = begin("nuclei", base, progress)
    feats = SegmenterFeatures.load(base_folder, threads=threads)
    spec = feats.spec
    if spec.task != "nuclei":
        raise HematoError(f"{base_folder}: model {spec.name!r} is for task {spec.task!r}, not 'nuclei'")
    replay = load_pixels_replay(base_folder, feats.run)
    reference = reference_regions(replay)
    regions = read_regions([Path(d) for d in data], feats, progress)
    if not any(r.nuclei for r in regions):
        raise HematoError("the corrections hold no nucleus: nothing to fine-tune on")
    threshold = float(spec.postprocess.get("threshold", 0.5))
    offset = float(np.log(threshold / (1 - threshold)))
    init = feats.init
    plan, how = folds(regions)
    plan = [(fit_regions, [_centre(r) for r in held]) for fit_regions, held in plan]
    cache: dict[int, Samples] = {}

    def samples(rs: list[Region]) -> Samples:
        for r in rs:
            if id(r) not in cache:
                cache[id(r)] = sample(r, np.random.default_rng(len(cache)))
        return Samples.merge([cache[id(r)] for r in rs], feats.dim)

    everything = samples(regions)
    fold_sets = [samples(fit_regions) for fit_regions, _ in plan]

    progress("scoring the shipped model", 0.47)
    before = {**reference_scores(init, reference, spec),
              **{f"heldout_{k}": v for k, v in object_scores(
                  [(init, held) for _, held in plan], spec, with_map=True).items()}}

    def fold_heads(l2: float, share: float) -> list:
        return [(fit(fs, replay, init, l2, share, offset), held) for fs, (_, held) in zip(fold_sets, plan, strict=True)]

    def scores(l2: float, share: float) -> dict:
        return {**{f"heldout_{k}": v for k, v in object_scores(fold_heads(l2, share), spec).items()},
                **reference_scores(fit(everything, replay, init, l2, share, offset), reference, spec)}

    tried, best = search_settings(SETTINGS, scores, keeps=lambda row: keeps_reference(row, before),
                                  score="heldout_score", what="foreground and distance",
                                  progress=progress, max_minutes=max_minutes)
    note = None
    progress("refitting on every correction", 0.92)
    if best is None or best["heldout_score"] <= before["heldout_score"] + 1e-9:
        note = ("no setting kept the reference within a point: " if best is None else
                "no setting beat the shipped layer on the held-out corrections: ")
        note += "the layer is written unchanged"
        best = {"l2": None, "share": 0.0, **{k: v for k, v in before.items() if k != "heldout_map"}}
        final = init
        heldout_map = before["heldout_map"]
    else:
        final = fit(everything, replay, init, best["l2"], best["share"], offset)
        heldout_map = object_scores(fold_heads(best["l2"], best["share"]), spec, with_map=True)["map"]
    after = {**reference_scores(final, reference, spec),
             **{f"heldout_{k}_of_the_split_fit": best[f"heldout_{k}"] for k in ("f1", "aji", "score")},
             "heldout_map_of_the_split_fit": heldout_map}
    if note:
        after["note"] = note

    model = onnx_edit.load(spec.onnx_path)
    head = feats.heads["foreground"]
    w = onnx_edit.initializer(model, head.weight).copy()
    b = onnx_edit.initializer(model, head.bias).copy()
    for role in ROLES:
        c = feats.heads[role].channel
        w[c, :, 0, 0] = final[role].weight
        b[c] = final[role].bias
    onnx_edit.set_initializer(model, head.weight, w)
    onnx_edit.set_initializer(model, head.bias, b)
    int8_model = _int8_with(spec, head, w, b)
    corrections = {"sources": [r.key for r in regions], "regions": len(regions),
                   "nuclei": int(sum(r.nuclei for r in regions)),
                   "pixels": int(sum(r.labels.size for r in regions)),
                   "per_region": [{"key": r.key, "nuclei": r.nuclei, "shape": list(r.labels.shape)}
                                  for r in regions], "heldout": how}
    metrics = {"threshold": threshold, "before": before, "after": after, "settings_tried": tried,
               "chosen": best, "reference": replay["description"],
               "headline": (f"reference F1 {before['reference_f1']:.3f} → "
                            f"{after['reference_f1']:.3f}; held-out F1 {before['heldout_f1']:.3f} → "
                            f"{after['heldout_f1_of_the_split_fit']:.3f}")}
    return finish(
        out, base_folder, spec, model, corrections=corrections, metrics=metrics,
        method="foreground and distance channels refit on the model's own features "
               "(napari_hemato.finetune.nuclei)",
        card=lambda stamp, minutes: card(spec, corrections, metrics, stamp, minutes, MAX_REFERENCE_DROP),
        progress=progress, overwrite=overwrite, int8_model=int8_model)


def _int8_with(spec, head, weight: np.ndarray, bias: np.ndarray):
    """The base's int8 network with the refit written into its last convolution, which
    quantization keeps float (same initializers, reading the dequantized features); None when
    the base has no int8 network or quantized that layer."""
    if not spec.int8:
        return None
    model = onnx_edit.load(spec.folder / spec.int8["onnx"])
    convs = [n for n in model.graph.node if n.op_type == "Conv" and head.weight in n.input]
    if len(convs) != 1 or list(convs[0].input)[1:3] != [head.weight, head.bias]:
        return None
    onnx_edit.set_initializer(model, head.weight, weight)
    onnx_edit.set_initializer(model, head.bias, bias)
    return model
