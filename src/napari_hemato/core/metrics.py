"""Detection and segmentation metrics on label images and point sets.

Pure numpy/scipy. Overlaps between two label images are counted sparsely (one
``np.unique`` over the paired ids of pixels that are foreground in both), so a
2000 × 2000 image with thousands of objects is scored in well under a second.

Conventions
-----------
- Label images: 0 is background, any positive integer is an object id (ids need
  not be consecutive).
- An instance is a true positive when it is matched one-to-one with
  ``IoU >= iou_threshold``. Matching is greedy by decreasing IoU, which is the
  optimal matching for thresholds >= 0.5 (there each object has at most one
  candidate with IoU > 0.5).
- Empty against empty counts as perfect (precision = recall = F1 = 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

PAIR_DTYPE = np.dtype([("gt", np.int64), ("pred", np.int64), ("iou", np.float64)])


class InstanceMatch(NamedTuple):
    """Result of :func:`match_instances`.

    ``pairs`` is a structured array with fields ``gt``, ``pred`` (object ids)
    and ``iou``, one row per true positive.
    """

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray


class _Overlap(NamedTuple):
    gt_ids: np.ndarray  # (n_gt,) object ids
    gt_areas: np.ndarray  # (n_gt,)
    pred_ids: np.ndarray
    pred_areas: np.ndarray
    gi: np.ndarray  # (k,) index into gt_ids of each overlapping pair
    pj: np.ndarray  # (k,) index into pred_ids
    inter: np.ndarray  # (k,) intersection in pixels
    iou: np.ndarray  # (k,)


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: gt {gt.shape} vs pred {pred.shape}")
    for name, a in (("gt", gt), ("pred", pred)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            raise ValueError(f"{name} must be an integer label image, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} has negative labels")
    return gt.astype(np.int64, copy=False), pred.astype(np.int64, copy=False)


def _areas(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids (> 0) and pixel counts of a label image."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if top <= 4 * flat.size + 1024:
        counts = np.bincount(flat, minlength=top + 1)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        return ids.astype(np.int64), counts[ids].astype(np.int64)
    ids, counts = np.unique(flat[flat > 0], return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


def _overlap(gt: np.ndarray, pred: np.ndarray) -> _Overlap:
    gt, pred = _check_labels(gt, pred)
    gt_ids, gt_areas = _areas(gt)
    pred_ids, pred_areas = _areas(pred)
    both = (gt > 0) & (pred > 0)
    g = gt[both]
    p = pred[both]
    if g.size:
        base = int(pred_ids[-1]) + 1
        k = g * base + p
        # raster runs of equal pairs first: sorting the runs is much cheaper than the pixels
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        run_len = np.diff(np.r_[starts, k.size])
        keys, inv = np.unique(k[starts], return_inverse=True)
        inter = np.bincount(inv, weights=run_len, minlength=keys.size)
        gi = np.searchsorted(gt_ids, keys // base)
        pj = np.searchsorted(pred_ids, keys % base)
        inter = inter.astype(np.int64)
        union = gt_areas[gi] + pred_areas[pj] - inter
        iou = inter / union
    else:
        gi = pj = inter = np.zeros(0, np.int64)
        iou = np.zeros(0, np.float64)
    return _Overlap(gt_ids, gt_areas, pred_ids, pred_areas, gi, pj, inter, iou)


def _greedy(
    a: np.ndarray, b: np.ndarray, score: np.ndarray, keep: np.ndarray, descending: bool
) -> np.ndarray:
    """Indices (into the candidate arrays) of a greedy one-to-one matching."""
    cand = np.flatnonzero(keep)
    if cand.size == 0:
        return cand
    order = np.argsort(-score[cand] if descending else score[cand], kind="stable")
    cand = cand[order]
    used_a: set[int] = set()
    used_b: set[int] = set()
    chosen = []
    for k in cand:
        i, j = int(a[k]), int(b[k])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        chosen.append(k)
    return np.asarray(chosen, dtype=np.int64)


def _match(ov: _Overlap, iou_threshold: float) -> InstanceMatch:
    keep = ov.iou >= iou_threshold
    if iou_threshold > 0.5:
        chosen = np.flatnonzero(keep)  # each object has at most one candidate
    else:
        chosen = _greedy(ov.gi, ov.pj, ov.iou, keep, descending=True)
    pairs = np.zeros(chosen.size, PAIR_DTYPE)
    pairs["gt"] = ov.gt_ids[ov.gi[chosen]]
    pairs["pred"] = ov.pred_ids[ov.pj[chosen]]
    pairs["iou"] = ov.iou[chosen]
    tp = int(chosen.size)
    return InstanceMatch(tp, int(ov.pred_ids.size) - tp, int(ov.gt_ids.size) - tp, pairs)


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Counts, precision, recall and F1 (1.0 where undefined: nothing to find, nothing found)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def match_instances(
    gt: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> InstanceMatch:
    """One-to-one matching of ground-truth and predicted instances by IoU.

    Parameters
    ----------
    gt, pred : (H, W) integer arrays
        Label images of the same shape (0 = background).
    iou_threshold : float
        A pair matches when ``IoU >= iou_threshold``.

    Returns
    -------
    InstanceMatch
        ``(tp, fp, fn, pairs)``; ``pairs`` has fields ``gt``, ``pred``, ``iou``.

    Examples
    --------
    >>> gt = np.zeros((4, 8), int); gt[:, :4] = 1
    >>> pred = np.zeros((4, 8), int); pred[:, 1:5] = 7
    >>> m = match_instances(gt, pred)
    >>> m.tp, m.fp, m.fn, float(m.pairs["iou"][0])
    (1, 0, 0, 0.6)
    """
    return _match(_overlap(gt, pred), iou_threshold)


def instance_f1(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Precision, recall and F1 of instances matched at ``iou_threshold``.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, and
        ``mean_iou`` of the matched pairs (``nan`` when there are none).

    Examples
    --------
    >>> lab = np.zeros((5, 5), int); lab[1:3, 1:3] = 1
    >>> instance_f1(lab, lab)["f1"]
    1.0
    """
    m = match_instances(gt, pred, iou_threshold=iou_threshold)
    out = prf(m.tp, m.fp, m.fn)
    out["mean_iou"] = float(m.pairs["iou"].mean()) if m.tp else float("nan")
    return out


def aggregated_jaccard_index(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, IEEE TMI 36:1550).

    Each ground-truth object is paired with the predicted object of highest
    IoU (a prediction may serve several ground-truth objects); the index is the
    sum of their intersections over the sum of their unions plus the area of
    every prediction never used. Empty against empty gives 1.0.

    Examples
    --------
    >>> gt = np.zeros((4, 8), int); gt[:, :4] = 1
    >>> pred = np.zeros((4, 8), int); pred[:, 1:5] = 1; pred[0, 7] = 2
    >>> round(aggregated_jaccard_index(gt, pred), 4)  # 12 / (20 + 1)
    0.5714
    """
    ov = _overlap(gt, pred)
    n_gt = ov.gt_ids.size
    if n_gt == 0:
        return 1.0 if ov.pred_ids.size == 0 else 0.0
    inter_sum = 0
    union_sum = int(ov.gt_areas.sum())  # objects without any overlap add |G|
    used = np.zeros(ov.pred_ids.size, bool)
    if ov.iou.size:
        # best prediction for each gt: sort by (gi, -iou) and take the first per gi
        order = np.lexsort((-ov.iou, ov.gi))
        gi_sorted = ov.gi[order]
        first = order[np.r_[True, gi_sorted[1:] != gi_sorted[:-1]]]
        inter = ov.inter[first]
        union = ov.gt_areas[ov.gi[first]] + ov.pred_areas[ov.pj[first]] - inter
        inter_sum = int(inter.sum())
        union_sum += int((union - ov.gt_areas[ov.gi[first]]).sum())
        used[ov.pj[first]] = True
    union_sum += int(ov.pred_areas[~used].sum())
    return float(inter_sum / union_sum) if union_sum else 1.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of half-open boxes ``(y0, x0, y1, x1)``: (n, 4) × (m, 4) -> (n, m).

    Examples
    --------
    >>> box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 5, 10, 15]])).round(3).tolist()
    [[0.333]]
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ih = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iw = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ih * iw
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(gt: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
                ) -> tuple[int, int, int, np.ndarray]:
    """Greedy one-to-one box matching by decreasing IoU; ``(tp, fp, fn, matched_pred_mask)``.

    Boxes are half-open ``(y0, x0, y1, x1)``; a pair matches at ``IoU >= iou_threshold``.

    Examples
    --------
    >>> gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    >>> pred = np.array([[1, 1, 10, 10], [50, 50, 60, 60]])
    >>> match_boxes(gt, pred)[:3]
    (1, 1, 1)
    """
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    matched = np.zeros(len(pred), bool)
    if len(gt) == 0 or len(pred) == 0:
        return 0, len(pred), len(gt), matched
    iou = box_iou(gt, pred)
    gi, pj = (a.ravel() for a in np.indices(iou.shape))
    chosen = _greedy(gi, pj, iou.ravel(), iou.ravel() >= iou_threshold, descending=True)
    matched[pj[chosen]] = True
    tp = int(chosen.size)
    return tp, len(pred) - tp, len(gt) - tp, matched


def box_scores(gt: np.ndarray, gt_classes, pred: np.ndarray, pred_classes, class_names, *,
               iou_threshold: float = 0.5, partly_annotated: str | None = None) -> dict:
    """Per-class ``tp, fp, fn, n_pred, n_gt`` of boxes matched one-to-one within each class
    (:func:`match_boxes`).

    ``partly_annotated`` names a class whose ground truth misses objects (BCCD's red cells):
    ``<name>_annotated_regions`` then counts as false positives only the unmatched predictions
    near some annotated box of any class (IoU ≥ 0.1), an optimistic bound.

    Examples
    --------
    >>> gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    >>> s = box_scores(gt, ["A", "B"], gt[::-1], ["B", "A"], ["A", "B"])
    >>> s["A"]["tp"], s["B"]["tp"]
    (1, 1)
    """
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt_classes, pred_classes = np.asarray(gt_classes, str), np.asarray(pred_classes, str)
    out = {}
    for name in class_names:
        g, sel = gt[gt_classes == name], pred_classes == name
        p = pred[sel]
        tp, fp, fn, matched = match_boxes(g, p, iou_threshold=iou_threshold)
        out[name] = {"tp": tp, "fp": fp, "fn": fn, "n_pred": int(sel.sum()), "n_gt": len(g)}
        if name == partly_annotated:
            near = (box_iou(p, gt).max(axis=1) >= 0.1) if len(gt) and len(p) else np.zeros(len(p), bool)
            out[f"{name}_annotated_regions"] = {"tp": tp, "fp": int((~matched & near).sum()), "fn": fn}
    return out


def mean_average_precision(
    gt: np.ndarray,
    pred: np.ndarray,
    thresholds: np.ndarray | list[float] = np.arange(0.5, 1.0, 0.05),  # noqa: B008
) -> float:
    """Data Science Bowl 2018 score: mean over IoU thresholds of TP/(TP+FP+FN).

    Examples
    --------
    >>> lab = np.zeros((5, 5), int); lab[1:3, 1:3] = 1
    >>> mean_average_precision(lab, lab)
    1.0
    """
    ov = _overlap(gt, pred)
    scores = []
    for t in np.asarray(thresholds, dtype=np.float64):
        m = _match(ov, float(t) - 1e-12)
        denom = m.tp + m.fp + m.fn
        scores.append(m.tp / denom if denom else 1.0)
    return float(np.mean(scores)) if scores else float("nan")


def match_points(gt_yx: np.ndarray, pred_yx: np.ndarray, radius: float) -> dict:
    """One-to-one matching of points within ``radius``, greedy by distance.

    As in the MIDOG challenge: pairs closer than ``radius`` are matched in
    order of increasing distance, each point at most once.

    Parameters
    ----------
    gt_yx, pred_yx : (n, 2) arrays
        Point coordinates (row, column), in any consistent unit.
    radius : float
        Largest distance of a match (inclusive), in the same unit.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` and
        ``pairs`` ((tp, 2) int array of (gt index, pred index)).

    Examples
    --------
    >>> r = match_points([[0, 0], [10, 10]], [[1, 0], [30, 30]], radius=3)
    >>> r["tp"], r["fp"], r["fn"], r["f1"]
    (1, 1, 1, 0.5)
    """
    g = np.asarray(gt_yx, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(pred_yx, dtype=np.float64).reshape(-1, 2)
    pairs = np.zeros((0, 2), np.int64)
    if len(g) and len(p):
        dmat = cKDTree(g).sparse_distance_matrix(cKDTree(p), radius, output_type="ndarray")
        if dmat.size:
            chosen = _greedy(dmat["i"], dmat["j"], dmat["v"], np.ones(dmat.size, bool), False)
            pairs = np.stack([dmat["i"][chosen], dmat["j"][chosen]], axis=1).astype(np.int64)
    tp = len(pairs)
    out: dict = prf(tp, len(p) - tp, len(g) - tp)
    out["pairs"] = pairs
    return out


def points_f1(gt_yx: np.ndarray, pred_yx: np.ndarray, radius: float) -> float:
    """F1 of :func:`match_points` (1.0 when both sets are empty).

    Examples
    --------
    >>> points_f1([[5, 5]], [[6, 6]], radius=2)
    1.0
    """
    return float(match_points(gt_yx, pred_yx, radius)["f1"])
