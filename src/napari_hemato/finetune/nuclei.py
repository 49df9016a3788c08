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
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.core.metrics import (
    aggregated_jaccard_index,
    match_instances,
    mean_average_precision,
)
from napari_hemato.core.postprocess import distance_target, postprocess_instances
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.common import FinetuneResult, Progress, begin, finish, search_settings
from napari_hemato.finetune.head import BinaryHead, logit
from napari_hemato.finetune.nuclei_card import card
from napari_hemato.finetune.pixels_replay import load_pixels_replay, val_crops
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.finetune.segmenter_regions import (
    Region,
    export_paths,
    fold_samples,
    read_exports,
)
from napari_hemato.finetune.segmenter_regions import fit_maps as fit

log = logging.getLogger(__name__)

#: (anchor l2, corrections' share of the loss) tried, most conservative first
SETTINGS = [(l2, share) for l2 in (10.0, 3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2) for share in (0.2, 0.5, 0.8)]
MAX_REFERENCE_DROP = 0.01


def read_regions(data: list[Path], feats: SegmenterFeatures, progress: Progress) -> list[Region]:
    """Every instance export in ``data`` (files or folders) on the model grid, with its features."""
    regions = []
    for region, _, labels, features in read_exports(
            export_paths(data, "masks"), feats, progress, span=0.4,
            no_mpp_hint="re-export it from an image whose µm/px is known (or typed in the Analyse widget)",
            budget_hint="export the regions you reviewed, not the whole slide"):
        regions.append(Region(region.key, labels, features, distance_target(labels)))
        log.info("%s: %d nuclei, %d×%d px on the model grid", region.key, regions[-1].nuclei, *labels.shape)
    return regions


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
    offset = logit(threshold)
    init = feats.init
    plan, how, everything, fold_sets = fold_samples(regions, feats.dim)

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

    model, w, b = feats.refit_layer(final)
    int8_model = _int8_with(spec, feats.heads["foreground"], w, b)
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
