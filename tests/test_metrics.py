"""Metrics on hand-computed tiny cases, plus a speed check on a large image."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_hemato.core.metrics import (
    aggregated_jaccard_index,
    instance_f1,
    match_instances,
    match_points,
    mean_average_precision,
    points_f1,
)


def _two_squares() -> np.ndarray:
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6] = 1
    lab[10:16, 10:16] = 5  # non-consecutive ids are fine
    return lab


def test_identical_is_perfect():
    lab = _two_squares()
    m = match_instances(lab, lab)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert np.allclose(m.pairs["iou"], 1.0)
    assert instance_f1(lab, lab)["f1"] == 1.0
    assert aggregated_jaccard_index(lab, lab) == 1.0
    assert mean_average_precision(lab, lab) == 1.0


def test_shifted_object_known_iou():
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1  # 16 px
    pred = np.zeros_like(gt)
    pred[0:4, 1:5] = 3  # shifted by one column: inter 12, union 20
    m = match_instances(gt, pred)
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert m.pairs["gt"][0] == 1 and m.pairs["pred"][0] == 3
    assert m.pairs["iou"][0] == pytest.approx(0.6)
    # at IoU 0.7 the same pair is a miss and a false alarm
    m7 = match_instances(gt, pred, iou_threshold=0.7)
    assert (m7.tp, m7.fp, m7.fn) == (0, 1, 1)
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(0.6)
    # DSB score: TP at 0.5, 0.55, 0.6 (inclusive), miss at 0.65 .. 0.95 -> 3 / 10
    assert mean_average_precision(gt, pred) == pytest.approx(0.3)


def test_empty_cases():
    empty = np.zeros((8, 8), np.int32)
    lab = np.zeros((8, 8), np.int32)
    lab[1:4, 1:4] = 2
    assert instance_f1(empty, empty) == pytest.approx(
        {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "mean_iou": np.nan},
        nan_ok=True,
    )
    r = instance_f1(lab, empty)
    assert (r["tp"], r["fp"], r["fn"], r["recall"], r["f1"]) == (0, 0, 1, 0.0, 0.0)
    r = instance_f1(empty, lab)
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["f1"]) == (0, 1, 0, 0.0, 0.0)
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert aggregated_jaccard_index(lab, empty) == 0.0
    assert aggregated_jaccard_index(empty, lab) == 0.0
    assert mean_average_precision(empty, empty) == 1.0
    assert mean_average_precision(lab, empty) == 0.0


def test_aji_known_value_split_and_spurious():
    # gt: one 4x8 object (32 px). pred: split into two halves + one spurious 2x2 object.
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:8] = 1
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 1  # 16 px, IoU 0.5 with gt
    pred[0:4, 4:8] = 2  # 16 px, IoU 0.5 (ties: first id wins), stays unused
    pred[8:10, 8:10] = 3  # 4 px, no overlap
    # C = 16, U = 32 + 16 (unused pred 2) + 4 (unused pred 3) = 52
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(16 / 52)
    m = match_instances(gt, pred)
    assert (m.tp, m.fp, m.fn) == (1, 2, 0)


def test_aji_prediction_reused_by_two_gt():
    # two gt objects merged by one prediction: the prediction is counted for both
    gt = np.zeros((4, 8), np.int32)
    gt[:, 0:4] = 1
    gt[:, 4:8] = 2
    pred = np.zeros_like(gt)
    pred[:, :] = 1
    # G1: I=16, U=32; G2: I=16, U=32 -> 32/64
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(0.5)
    # IoU exactly 0.5 matches (inclusive), but only once
    r = instance_f1(gt, pred)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)


def test_low_threshold_matching_is_one_to_one():
    gt = np.zeros((4, 12), np.int32)
    gt[:, 0:6] = 1
    pred = np.zeros_like(gt)
    pred[:, 0:3] = 1
    pred[:, 3:6] = 2
    m = match_instances(gt, pred, iou_threshold=0.3)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="shape"):
        match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        match_instances(np.zeros((3, 3)), np.zeros((3, 3), int))


def test_points():
    gt = [[0, 0], [10, 10], [20, 20]]
    pred = [[0, 1], [0, 2], [10, 12], [50, 50]]
    r = match_points(gt, pred, radius=2.5)
    # (0,0)-(0,1) d=1, (10,10)-(10,12) d=2; (0,2) is a duplicate -> fp
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 1)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 7)
    assert sorted(map(tuple, r["pairs"].tolist())) == [(0, 0), (1, 2)]
    assert points_f1([], [], 3) == 1.0
    assert points_f1([[1, 1]], [], 3) == 0.0
    # greedy by distance: the closest pair wins even if listed later
    r = match_points([[0, 0]], [[0, 2], [0, 1]], radius=3)
    assert r["pairs"].tolist() == [[0, 1]]
    # radius is inclusive
    assert points_f1([[0, 0]], [[0, 3]], radius=3) == 1.0


def test_large_image_is_fast():
    rng = np.random.default_rng(0)
    n = 2000
    yy, xx = np.mgrid[0:n, 0:n]
    # ~6000 blobs on a jittered grid
    gt = ((yy // 25) * (n // 25) + (xx // 25) + 1).astype(np.int32)
    gt[(yy % 25 < 3) | (xx % 25 < 3)] = 0
    shift = rng.integers(-3, 4, size=2)
    pred = np.roll(gt, tuple(shift), axis=(0, 1)) * 3
    t0 = time.perf_counter()
    r = instance_f1(gt, pred)
    aji = aggregated_jaccard_index(gt, pred)
    elapsed = time.perf_counter() - t0
    assert r["tp"] > 6000
    assert 0 < aji <= 1
    assert elapsed < 2.0, f"metrics too slow: {elapsed:.2f} s"
