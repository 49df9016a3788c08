"""Fine-tune the smear cell detector on a user's corrected fields, without torch.

1. Read the corrections: the plugin's instance exports of smear fields (label TIFF,
   OME-Zarr, COCO, GeoJSON) with their images (:mod:`napari_hemato.core.export.regions`). An
   exported field is taken as reviewed: every cell as drawn, every other pixel background.
   An object's class is its cell type: ``cell_type`` when it names a class of the model
   (the smear pipeline puts the white-cell subtype in ``class``), else ``class``; a white-cell
   subtype alone counts as WBC (PLT as Platelets). Objects of any other class are left out:
   their pixels are never sampled nor scored.
2. Resample each field to the model's µm/px and run the model for its per-pixel features
   (:mod:`napari_hemato.finetune.segmenter_features`). Targets: ``labels > 0``,
   :func:`~napari_hemato.core.postprocess.distance_target` and each cell pixel's class.
3. Refit the last 1×1 convolution, anchored to the shipped weights: its foreground and
   distance channels as the nucleus fine-tune does
   (:func:`~napari_hemato.finetune.segmenter_regions.fit_maps`), and its class channels as a
   softmax regression (:func:`~napari_hemato.finetune.head.fit_soft_head`) on the cell
   pixels, classes weighted by the inverse square root of their pixel share as in training,
   plus the replay's pixels with the shipped head's own class probabilities (weighted by its own
   foreground probability: training scored classes on cells only). The anchor and the
   corrections' share are chosen on held-out corrections (up to 5 folds, each field held out
   once) by the mean over classes of the per-class panoptic quality (object F1 at mask IoU ≥ 0.5
   × the matched objects' mean IoU: outlines count) after the engine's own post-processing (the
   stain rule included), among the settings that keep the
   reference objective within a point: the mean of WBC F1, platelet F1 and RBC F1 in annotated
   regions (box IoU ≥ 0.5, :func:`~napari_hemato.core.metrics.box_scores`) on the BCCD
   validation fields shipped in the replay (:mod:`napari_hemato.finetune.smear_replay`).
4. Write the refit into a copy of the ONNX graph: an ordinary model folder for
   ``analyze --task smear --model``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.core.metrics import box_scores, match_instances, prf
from napari_hemato.core.objects import tile_objects
from napari_hemato.core.postprocess import distance_target
from napari_hemato.core.resample import to_model_grid
from napari_hemato.core.tiling import plan_tiles
from napari_hemato.finetune.common import FinetuneResult, Progress, begin, finish, search_settings
from napari_hemato.finetune.head import BinaryHead, Head, fit_soft_head, logit, sigmoid
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.finetune.segmenter_regions import (
    Region,
    Samples,
    export_paths,
    fit_maps,
    fold_samples,
    read_exports,
)
from napari_hemato.finetune.smear_card import card
from napari_hemato.finetune.smear_replay import load_smear_replay

log = logging.getLogger(__name__)

#: (anchor l2, corrections' share of the loss) tried, most conservative first (the nucleus
#: fine-tune's anchors; a share of 0.2 never won on the benchmark's labs, and every setting
#: costs a fit per fold here)
SETTINGS = [(l2, share) for l2 in (10.0, 3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2) for share in (0.5, 0.8)]
MAX_REFERENCE_DROP = 0.01
#: pixels sampled per field and stratum (each class's cells, the band around them, the rest)
PER_STRATUM = 1000
#: a white-cell subtype (the WBC classifier's classes) given as an object's class: its cell type
SUBTYPE_TYPE = {"PLT": "Platelets"}
PARTLY_ANNOTATED = "RBC"  # BCCD leaves many red cells unannotated (see train.evaluate_smear)


@dataclass
class Heads:
    """The refit layer: the foreground and distance channels and the class channels."""

    maps: dict[str, BinaryHead]
    classes: Head


def object_classes(region, class_names) -> tuple[dict[int, int], list[str]]:
    """``({label id: class index}, [class names left out])`` of an exported region."""
    from napari_hemato.models.cell_classifier import CLASS_NAMES as SUBTYPES

    names = list(class_names)
    types = (dict(zip(region.table["id"].astype(np.int64).tolist(), region.table["cell_type"].astype(str), strict=True))
             if "cell_type" in region.table else {})
    out, unknown = {}, set()
    for i, name in region.classes.items():
        for candidate in (types.get(i), name, SUBTYPE_TYPE.get(name, "WBC") if name in SUBTYPES else None):
            if candidate in names:
                out[int(i)] = names.index(candidate)
                break
        else:
            unknown.add(name)
    return out, sorted(unknown)


def read_fields(paths: list[Path], feats: SegmenterFeatures, progress: Progress) -> list[Region]:
    """Every instance export in ``paths`` on the model grid, with features, classes and the image."""
    names = feats.spec.class_names
    regions, left_out = [], set()
    for region, image, labels, features in read_exports(
            paths, feats, progress, span=0.3, pad_edges=True,
            no_mpp_hint="re-export it from a field whose µm/px is known (measured on its red cells or "
                        "typed in the Analyse widget)",
            budget_hint="export the fields you reviewed, not a whole slide"):
        classes, unknown = object_classes(region, names)
        left_out.update(unknown)
        lut = np.full(int(labels.max()) + 1, -1, np.int8)
        for i, c in classes.items():
            if i < len(lut):
                lut[i] = c
        pixel_class = np.where(labels > 0, lut[labels], -1).astype(np.int8)
        ignore = (labels > 0) & (pixel_class < 0)
        labels = np.where(ignore, 0, labels).astype(np.int32)
        regions.append(Region(region.key, labels, features, distance_target(labels), pixel_class, image,
                              ignore if ignore.any() else None))
        log.info("%s: %d cells, %d×%d px on the model grid", region.key, regions[-1].nuclei, *labels.shape)
    if left_out:
        log.warning("objects of classes %s are not cells this model detects: left out", left_out)
    return regions


def field_objects(features: np.ndarray, heads: Heads, image: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels (H, W), class index per object (n,), boxes (n, 4))`` of one field with ``heads``,
    post-processed as the engine does (one tile, the stain rule, the size limit); label ``k`` is
    object ``k - 1``."""
    fg, dist = SegmenterFeatures.maps(features, heads.maps)
    probs = SegmenterFeatures.class_maps(features, heads.classes)
    h, w = fg.shape
    plan = plan_tiles((h, w), tile=max(h, w), halo=0)
    out = tile_objects({"foreground": fg[None], "distance": dist[None], "class_probs": probs}, plan[0], plan,
                       spec, spec.mpp, stride=1 << 20, image=image, outer=(0, 0, h, w))
    if not out.n_objects:
        return np.zeros((h, w), np.int32), np.zeros(0, np.int64), np.zeros((0, 4))
    cls = out.columns["prob"].argmax(1)
    if "rule_class" in out.columns:
        cls = np.where(out.columns["rule_class"] >= 0, out.columns["rule_class"], cls)
    boxes = np.stack([out.columns[k] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")], 1).astype(np.float64)
    return out.fragment.astype(np.int32), cls.astype(np.int64), boxes


def _per_class(totals: dict[str, list[int]]) -> dict:
    return {c: prf(*t) for c, t in totals.items()}


def heldout_scores(pairs: list[tuple[Heads, list[Region]]], spec) -> dict:
    """Per-class object F1 and panoptic quality (PQ = F1 × mean IoU of the matched pairs; mask
    IoU ≥ 0.5, pooled over fields) of each ``(heads, regions)`` pair's regions, and ``score``:
    the mean PQ over the classes the regions hold (the outlines count, not only the matches)."""
    names = list(spec.class_names)
    totals = {c: [0, 0, 0] for c in names}
    iou_sum = dict.fromkeys(names, 0.0)
    present = set()
    for heads, regions in pairs:
        for r in regions:
            pred, pred_cls, _ = field_objects(r.features, heads, r.image, spec)
            if r.ignore is not None and pred.max():  # cells of classes left out: not scored
                n = int(pred.max())
                inside = np.bincount(pred[r.ignore], minlength=n + 1)
                area = np.bincount(pred.ravel(), minlength=n + 1)
                drop = np.flatnonzero(inside > 0.5 * np.maximum(area, 1))
                pred = np.where(np.isin(pred, drop), 0, pred)
            true_cls = np.where(r.labels > 0, r.classes, -1)
            for c, name in enumerate(names):
                truth = np.where(true_cls == c, r.labels, 0)
                lut = np.concatenate([[0], np.where(pred_cls == c, np.arange(1, len(pred_cls) + 1), 0)])
                if truth.any():
                    present.add(name)
                m = match_instances(truth, lut[pred])
                totals[name] = [totals[name][0] + m.tp, totals[name][1] + m.fp, totals[name][2] + m.fn]
                iou_sum[name] += float(m.pairs["iou"].sum())
    per = _per_class(totals)
    for c in names:
        tp = per[c]["tp"]
        per[c]["pq"] = per[c]["f1"] * (iou_sum[c] / tp if tp else (1.0 if per[c]["f1"] == 1.0 else 0.0))
    score = float(np.mean([per[c]["pq"] for c in names if c in present])) if present else float("nan")
    return {"score": score, **{f"{c}_f1": per[c]["f1"] for c in names},
            **{f"{c}_pq": per[c]["pq"] for c in names}, "per_class": per}


@dataclass
class ReferenceGrid:
    """A reference field on the model grid: its features and pixels, and its level-0 boxes."""

    key: str
    features: np.ndarray
    image: np.ndarray
    scale: tuple[float, float]  # level-0 px per model-grid px (rows, columns)
    boxes: np.ndarray
    classes: np.ndarray


def reference_grids(replay: dict, feats: SegmenterFeatures) -> list[ReferenceGrid]:
    out = []
    for f in replay["fields"]:
        image, _ = to_model_grid(f.image, None, f.mpp, feats.spec.mpp)
        scale = (f.image.shape[0] / image.shape[0], f.image.shape[1] / image.shape[1])
        out.append(ReferenceGrid(f.key, feats.run(image, pad_edges=True), image, scale, f.boxes, f.classes))
    return out


def reference_scores(heads: Heads, reference: list[ReferenceGrid], spec) -> dict:
    """Box F1 per class on the reference fields and ``reference_objective``: the mean of the
    classes' F1, a partly annotated class's (RBC) counted in annotated regions."""
    names = list(spec.class_names)
    keys = [*names, f"{PARTLY_ANNOTATED}_annotated_regions"]
    totals = {k: [0, 0, 0] for k in keys}
    for g in reference:
        _, cls, boxes = field_objects(g.features, heads, g.image, spec)
        level0 = boxes * np.array([g.scale[0], g.scale[1], g.scale[0], g.scale[1]])
        s = box_scores(g.boxes, g.classes, level0, np.asarray(names)[cls] if len(cls) else np.zeros(0, str),
                       names, partly_annotated=PARTLY_ANNOTATED if PARTLY_ANNOTATED in names else None)
        for k in keys:
            if k in s:
                totals[k] = [totals[k][0] + s[k]["tp"], totals[k][1] + s[k]["fp"], totals[k][2] + s[k]["fn"]]
    per = _per_class(totals)
    counted = [f"{c}_annotated_regions" if c == PARTLY_ANNOTATED and c in names else c for c in names]
    return {"reference_objective": float(np.mean([per[k]["f1"] for k in counted])),
            **{f"reference_{c}_f1": per[c]["f1"] for c in counted}}


def class_weights(s: Samples, n_classes: int) -> np.ndarray:
    """Inverse square root of each class's share of the corrections' cell pixels (as training
    weighs its classes), scaled to a weighted mean of 1; 0 for a class the corrections lack."""
    share = np.bincount(s.cls[s.cls >= 0], s.weight[s.cls >= 0], minlength=n_classes)
    share = share / max(share.sum(), 1e-12)
    w = np.where(share > 0, 1 / np.sqrt(np.maximum(share, 1e-12)), 0.0)
    return w / max(float((w * share).sum()), 1e-12)


def fit_classes(s: Samples, replay: dict, init: Heads, l2: float, share: float) -> Head:
    """The class channels refit on the corrections' cell pixels and the replay."""
    n = init.classes.weight.shape[0]
    cells = s.cls >= 0
    rx = replay["train_x"]
    own_fg = sigmoid(init.maps["foreground"].logits(rx))
    rw = replay["train_w"] * own_fg
    x = np.concatenate([s.x[cells], rx])
    target = np.concatenate([np.eye(n)[s.cls[cells]], init.classes.probs(rx)])
    wc = s.weight[cells] * class_weights(s, n)[s.cls[cells]]
    weight = np.concatenate([share * wc / max(wc.sum(), 1e-12), (1 - share) * rw / max(rw.sum(), 1e-12)])
    if not cells.any():
        return init.classes
    return fit_soft_head(x, target, init.classes, sample_weight=weight, l2=l2)


def fit(s: Samples, replay: dict, init: Heads, l2: float, share: float, offset: float) -> Heads:
    return Heads(fit_maps(s, replay, init.maps, l2, share, offset), fit_classes(s, replay, init, l2, share))


def keeps_reference(row: dict, before: dict) -> bool:
    return row["reference_objective"] >= before["reference_objective"] - MAX_REFERENCE_DROP


def finetune_smear(data: list[str | Path], out: str | Path, *, base: str | Path | None = None,
                   max_minutes: float = 2.0, progress: Progress | None = None, overwrite: bool = False,
                   threads: int | None = None) -> FinetuneResult:
    """Fine-tune the smear cell detector ``base`` (default: bundled) on corrected fields in ``data``.

    ``data``: instance exports (files, or folders of them) with their images; the steps are
    the module's, the keywords :func:`napari_hemato.api.finetune`'s.

    Examples
    --------
    >>> finetune_smear(["exports/"], "my_smear_model")  # doctest: +SKIP
    FinetuneResult(folder=PosixPath('my_smear_model'), ...)
    """
    progress, base_folder = begin("smear", base, progress)
    feats = SegmenterFeatures.load(base_folder, threads=threads)
    spec = feats.spec
    if spec.task != "smear" or feats.init_classes is None:
        raise HematoError(f"{base_folder}: model {spec.name!r} is for task {spec.task!r}, not a smear "
                          "cell detector with class maps")
    paths = export_paths([Path(d) for d in data], "cells")
    replay = load_smear_replay(base_folder, feats.run, spec.class_names)
    progress("reading the reference fields", 0.02)
    reference = reference_grids(replay, feats)
    regions = read_fields(paths, feats, progress)
    if not any(r.nuclei for r in regions):
        raise HematoError("the corrections hold no cell of a class this model detects: nothing to fine-tune on")
    threshold = float(spec.postprocess.get("threshold", 0.5))
    offset = logit(threshold)
    init = Heads(feats.init, feats.init_classes)
    plan, how, everything, fold_sets = fold_samples(regions, feats.dim, PER_STRATUM)

    def held_pairs(heads_per_fold: list[Heads]):
        return [(h, held) for h, (_, held) in zip(heads_per_fold, plan, strict=True)]

    progress("scoring the shipped model", 0.45)
    before_held = heldout_scores(held_pairs([init] * len(plan)), spec)
    before = {**reference_scores(init, reference, spec),
              **{f"heldout_{k}": v for k, v in before_held.items() if k != "per_class"}}

    to_beat = [before["heldout_score"]]  # the best held-out score of a setting kept so far

    def scores(l2: float, share: float) -> dict:
        folds_fit = [fit(fs, replay, init, l2, share, offset) for fs in fold_sets]
        held = heldout_scores(held_pairs(folds_fit), spec)
        row = {f"heldout_{k}": v for k, v in held.items() if k != "per_class"}
        if row["heldout_score"] <= to_beat[0] + 1e-9:
            # it cannot be chosen: the reference (a fit on everything, 44 fields) is not measured
            return {**row, "reference_objective": float("nan")}
        row.update(reference_scores(fit(everything, replay, init, l2, share, offset), reference, spec))
        if keeps_reference(row, before):
            to_beat[0] = row["heldout_score"]
        return row

    tried, best = search_settings(SETTINGS, scores, keeps=lambda row: keeps_reference(row, before),
                                  score="heldout_score", what="foreground, distance and class channels",
                                  progress=progress, max_minutes=max_minutes)
    note = None
    progress("refitting on every correction", 0.92)
    if best is None or best["heldout_score"] <= before["heldout_score"] + 1e-9:
        lost_reference = any(np.isfinite(t["reference_objective"]) for t in tried)
        note = ("no setting that beat the shipped layer on the held-out corrections kept the reference "
                "within a point: " if lost_reference else
                "no setting beat the shipped layer on the held-out corrections: ")
        note += "the layer is written unchanged"
        best = {"l2": None, "share": 0.0, **before}
        final = init
    else:
        final = fit(everything, replay, init, best["l2"], best["share"], offset)
    after = {**reference_scores(final, reference, spec),
             **{f"{k}_of_the_split_fit": v for k, v in best.items() if k.startswith("heldout_")}}
    if note:
        after["note"] = note

    model, _, _ = feats.refit_layer(final.maps, final.classes)
    counts = {c: 0 for c in spec.class_names}
    for r in regions:
        ids, first = np.unique(r.labels, return_index=True)
        for i, at in zip(ids, first, strict=True):
            if i:
                counts[spec.class_names[int(r.classes.ravel()[at])]] += 1
    corrections = {"sources": [r.key for r in regions], "regions": len(regions),
                   "cells": int(sum(r.nuclei for r in regions)), "per_class": counts,
                   "pixels": int(sum(r.labels.size for r in regions)),
                   "per_region": [{"key": r.key, "cells": r.nuclei, "shape": list(r.labels.shape)}
                                  for r in regions], "heldout": how}
    metrics = {"threshold": threshold, "before": before, "after": after, "settings_tried": tried,
               "chosen": best, "reference": replay["description"],
               "heldout_per_class_before": before_held["per_class"],
               "headline": (f"reference objective {before['reference_objective']:.3f} → "
                            f"{after['reference_objective']:.3f}; held-out mean class PQ "
                            f"{before['heldout_score']:.3f} → {after['heldout_score_of_the_split_fit']:.3f}")}
    return finish(
        out, base_folder, spec, model, corrections=corrections, metrics=metrics,
        method="foreground, distance and class channels refit on the model's own features "
               "(napari_hemato.finetune.smear)",
        card=lambda stamp, minutes: card(spec, corrections, metrics, stamp, minutes, MAX_REFERENCE_DROP),
        progress=progress, overwrite=overwrite)
