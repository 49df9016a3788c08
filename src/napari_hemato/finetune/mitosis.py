"""Fine-tune the mitosis detector on a user's corrected points, without torch.

1. Read the corrections: points CSV exports beside their images
   (:mod:`napari_hemato.finetune.points_data`): kept or added figures are positives,
   rejected points negatives.
2. Run the model itself on a window around each point, at its µm/px as ``analyze`` reads
   the image, and take the per-pixel features its last 1×1 convolution reads (its
   ``features`` output; :mod:`napari_hemato.finetune.point_samples`).
3. Refit that convolution's heatmap channel (an anchored per-pixel logistic regression,
   :func:`napari_hemato.finetune.head.fit_binary_head`, its boundary at the detection
   threshold) on the corrections plus the model's replay (reference features shipped in
   ``replay.npz``, never images). The anchor and the corrections' share are chosen on
   held-out corrections (a held-out image when there are several, else a seeded fifth of
   the points) among the settings that keep the reference recall within one point.
4. Write the refit channel into a copy of the ONNX graph (the class probabilities are
   untouched): an ordinary model folder for ``analyze --task mitosis --model``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.common import FinetuneResult, Progress, begin, finish, search_settings
from napari_hemato.finetune.features import HeatmapFeatures
from napari_hemato.finetune.head import BinaryHead, fit_binary_head, logit, sigmoid
from napari_hemato.finetune.mitosis_card import card
from napari_hemato.finetune.point_samples import PointSamples, image_samples
from napari_hemato.finetune.points_data import read_corrections
from napari_hemato.finetune.points_replay import load_points_replay

#: (anchor l2, corrections' share of the loss) tried, most conservative first
SETTINGS = [(l2, share) for l2 in (10.0, 3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2) for share in (0.05, 0.2, 0.5, 0.8)]
MAX_REFERENCE_DROP = 0.01
BACKGROUND_SHARE = 0.1  # of the corrections' share
MIN_HELD_OUT = 5  # fewer corrections than this: nothing is held out, the fit is checked on itself


def _rate(head: BinaryHead, discs, offset: float, *, above: bool) -> float:
    """Share of discs whose best logit is above (``above``) / below the threshold."""
    best = [head.logits(d).max() for d in discs if d is not None and len(d)]
    if not best:
        return float("nan")
    best = np.asarray(best)
    return float(np.mean(best >= offset if above else best < offset))


def _scores(head: BinaryHead, s: PointSamples, offset: float) -> dict:
    kept = _rate(head, s.pos_discs, offset, above=True)
    removed = _rate(head, s.neg_discs, offset, above=False)
    both = [v for v in (kept, removed) if np.isfinite(v)]
    return {"figures_kept": kept, "rejections_held": removed,
            "agreement": float(np.mean(both)) if both else float("nan")}


def _reference(head: BinaryHead, replay: dict, offset: float) -> dict:
    pos = replay["val_pos_x"]
    best = head.logits(pos.reshape(-1, pos.shape[-1])).reshape(pos.shape[:2]).max(1)
    return {"reference_recall": float(np.mean(best >= offset)),
            "reference_hard_negatives_above": float(np.mean(head.logits(replay["val_neg_x"]) >= offset))}


def _keeps_reference(row: dict, before: dict) -> bool:
    """Reference recall down by at most a point, and reference hard negatives above the
    threshold up by at most a point."""
    return (row["reference_recall"] >= before["reference_recall"] - MAX_REFERENCE_DROP
            and row["reference_hard_negatives_above"]
            <= before["reference_hard_negatives_above"] + MAX_REFERENCE_DROP)


def _subset(s: PointSamples, pos_keep, neg_keep) -> PointSamples:
    pos_keep, neg_keep = np.asarray(pos_keep, bool), np.asarray(neg_keep, bool)
    groups = np.flatnonzero(neg_keep)
    rows = np.isin(s.neg_group, groups)
    return PointSamples(s.pos_x[pos_keep], s.neg_x[rows], s.neg_group[rows], s.bg_x,
                        [d for d, k in zip(s.pos_discs, pos_keep, strict=True) if k],
                        [d for d, k in zip(s.neg_discs, neg_keep, strict=True) if k])


def _merge(parts: list[PointSamples], d: int) -> PointSamples:
    if not parts:
        return PointSamples(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0, int), np.zeros((0, d)))
    offsets = np.cumsum([0] + [len(p.neg_discs) for p in parts[:-1]])
    return PointSamples(np.concatenate([p.pos_x for p in parts]), np.concatenate([p.neg_x for p in parts]),
                        np.concatenate([p.neg_group + o for p, o in zip(parts, offsets, strict=True)]),
                        np.concatenate([p.bg_x for p in parts]),
                        [d for p in parts for d in p.pos_discs], [d for p in parts for d in p.neg_discs])


def _split(per_image: list[PointSamples], d: int, seed: int = 0) -> tuple[PointSamples, PointSamples, str]:
    """(fit, held-out, how): a held-out image when several have corrections, else a seeded
    fifth of the figures and of the rejections; nothing held out with few corrections."""
    used = [s for s in per_image if len(s.pos_discs) + len(s.neg_discs)]
    n = sum(len(s.pos_discs) + len(s.neg_discs) for s in used)
    empty = _merge([], d)
    if n < MIN_HELD_OUT:
        return _merge(used, d), empty, f"none ({n} corrections: checked on the fit itself)"
    rng = np.random.default_rng(seed)
    if len(used) >= 2:
        k = max(1, int(round(0.2 * len(used))))
        held = set(rng.permutation(len(used))[:k].tolist())
        return (_merge([s for i, s in enumerate(used) if i not in held], d),
                _merge([s for i, s in enumerate(used) if i in held], d), f"{k} of {len(used)} images")
    s = used[0]

    def fifth(m):
        mask = np.zeros(m, bool)
        if m >= 3:
            mask[rng.permutation(m)[: max(1, int(round(0.2 * m)))]] = True
        return mask

    hp, hn = fifth(len(s.pos_discs)), fifth(len(s.neg_discs))
    return _subset(s, ~hp, ~hn), _subset(s, hp, hn), "a seeded fifth of the figures and of the rejections"


def _fit(s: PointSamples, replay: dict, init: BinaryHead, l2: float, share: float, offset: float) -> BinaryHead:
    """Hard labels for the user's figures and rejections; the shipped head's own calls
    (soft labels) for the background and the replay, so that without corrections the
    optimum is the shipped head itself and every change is the corrections' doing."""
    parts, weights, labels = [], [], []

    def add(x, y, total):
        if len(x) and total > 0:
            parts.append(x)
            labels.append(np.broadcast_to(y, (len(x),)).astype(np.float64))
            weights.append(np.full(len(x), total / len(x)))

    def own(x):
        return sigmoid(init.logits(x) - offset)

    have = [len(s.pos_x) > 0, len(s.neg_x) > 0]
    point_share = share * (1 - BACKGROUND_SHARE) / max(sum(have), 1)
    add(s.pos_x, 1.0, point_share)
    if len(s.neg_x):  # each rejected point weighs the same, however many pixels it has
        sizes = np.bincount(s.neg_group)[s.neg_group]
        parts.append(s.neg_x)
        labels.append(np.zeros(len(s.neg_x)))
        weights.append(point_share / len(np.unique(s.neg_group)) / sizes)
    add(s.bg_x, own(s.bg_x), share * BACKGROUND_SHARE)
    rx, ry = replay["train_x"], replay["train_y"]
    add(rx[ry == 1], own(rx[ry == 1]), (1 - share) / 2)
    add(rx[ry == 0], own(rx[ry == 0]), (1 - share) / 2)
    return fit_binary_head(np.concatenate(parts), np.concatenate(labels), init,
                           sample_weight=np.concatenate(weights), l2=l2, offset=offset)


def finetune_mitosis(data: list[str | Path], out: str | Path, *, base: str | Path | None = None,
                     max_minutes: float = 2.0, progress: Progress | None = None, overwrite: bool = False,
                     threads: int | None = None) -> FinetuneResult:
    """Fine-tune the mitosis detector ``base`` (default: bundled) on corrected points in ``data``.

    ``data``: points CSV exports (files, or folders of them) beside their images; the steps
    are the module's, the keywords :func:`napari_hemato.api.finetune`'s.

    Examples
    --------
    >>> finetune_mitosis(["exports/slide1_points.csv"], "my_mitosis_model")  # doctest: +SKIP
    FinetuneResult(folder=PosixPath('my_mitosis_model'), ...)
    """
    progress, base_folder = begin("mitosis", base, progress)
    feats = HeatmapFeatures.load(base_folder, threads=threads)
    spec = feats.predictor.spec
    if spec.task != "mitosis":
        raise HematoError(f"{base_folder}: model {spec.name!r} is for task {spec.task!r}, not 'mitosis'")
    items = read_corrections([Path(d) for d in data], spec.class_names)
    replay = load_points_replay(base_folder, feats)
    threshold = float(spec.postprocess.get("threshold", 0.5))
    offset = logit(threshold)
    init = BinaryHead(feats.weight.copy(), feats.bias)

    per_image = []
    n_points = sum(len(i.positives) + len(i.negatives) for i in items)
    done = 0
    for k, item in enumerate(items):
        def report(i, n, base_done=done):
            progress(f"reading features {base_done + i}/{n_points}", 0.05 + 0.45 * (base_done + i) / max(n_points, 1))
        per_image.append(image_samples(item, feats, seed=k, progress=report))
        done += len(item.positives) + len(item.negatives)
    d = len(feats.weight)
    fit_set, held, how = _split(per_image, d)
    everything = _merge(per_image, d)
    check = held if len(held.pos_discs) + len(held.neg_discs) else fit_set
    before = {**_reference(init, replay, offset), **{f"heldout_{k}": v for k, v in _scores(init, check, offset).items()},
              **{f"corrections_{k}": v for k, v in _scores(init, everything, offset).items()}}

    def scores(l2: float, share: float) -> dict:
        head = _fit(fit_set, replay, init, l2, share, offset)
        return {**{f"heldout_{k}": v for k, v in _scores(head, check, offset).items()},
                **_reference(head, replay, offset)}

    tried, best = search_settings(SETTINGS, scores, keeps=lambda row: _keeps_reference(row, before),
                                  score="heldout_agreement", what="heatmap", progress=progress,
                                  max_minutes=max_minutes)
    note = None
    progress("refitting on every correction", 0.92)
    if best is None:  # the corrections contradict the reference: the shipped layer is kept
        best = {"l2": None, "share": 0.0, **{f"heldout_{k}": v for k, v in _scores(init, check, offset).items()},
                **_reference(init, replay, offset)}
        note = "no setting kept the reference within a point: the heatmap layer is written unchanged"
        final = init
    else:
        final = _fit(everything, replay, init, best["l2"], best["share"], offset)
    after = {**_reference(final, replay, offset),
             **{f"heldout_{k}_of_the_split_fit": best[f"heldout_{k}"]
                for k in ("figures_kept", "rejections_held", "agreement")},
             **{f"corrections_{k}": v for k, v in _scores(final, everything, offset).items()}}
    if final is not init and not _keeps_reference(after, before):
        final = _fit(fit_set, replay, init, best["l2"], best["share"], offset)
        after.update(_reference(final, replay, offset))
        note = "the refit on every correction lost reference recall or precision: the split fit is written"
    if note:
        after["note"] = note

    model = onnx_edit.load(spec.onnx_path)
    w = onnx_edit.initializer(model, feats.head.weight).copy()
    b = onnx_edit.initializer(model, feats.head.bias).copy()
    w[feats.head.channel, :, 0, 0] = final.weight
    b[feats.head.channel] = final.bias
    onnx_edit.set_initializer(model, feats.head.weight, w)
    onnx_edit.set_initializer(model, feats.head.bias, b)
    corrections = {"sources": [str(i.csv) for i in items], "images": [str(i.image) for i in items],
                   "points": n_points, "figures": int(sum(len(i.positives) for i in items)),
                   "rejections": int(sum(len(i.negatives) for i in items)),
                   "per_image": [{"csv": str(i.csv), **i.labels} for i in items], "heldout": how}
    metrics = {"threshold": threshold, "before": before, "after": after, "settings_tried": tried,
               "chosen": best, "reference": replay["description"]}
    return finish(
        out, base_folder, spec, model, corrections=corrections, metrics=metrics,
        method="heatmap channel refit on the model's own features (napari_hemato.finetune.mitosis)",
        card=lambda stamp, minutes: card(spec, corrections, metrics, stamp, minutes, MAX_REFERENCE_DROP),
        progress=progress, overwrite=overwrite)
