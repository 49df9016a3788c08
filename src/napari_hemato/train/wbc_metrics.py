"""Classification metrics of the WBC classifier: report, calibration, PBC groups (numpy only)."""

from __future__ import annotations

import numpy as np

from napari_hemato.train.data_coarse import GROUPS


def classification_report(probs: np.ndarray, labels: np.ndarray, names) -> dict:
    """Accuracy, macro-F1, balanced accuracy (mean recall), per-class precision / recall / F1 /
    support and confusion (rows = truth).

    Examples
    --------
    >>> r = classification_report(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]), ["a", "b"])
    >>> r["accuracy"], r["confusion"]
    (0.6667, [[1, 0], [1, 1]])
    """
    probs, labels = np.asarray(probs), np.asarray(labels, int)
    k = len(names)
    pred = probs.argmax(1)
    conf = np.zeros((k, k), int)
    np.add.at(conf, (labels, pred), 1)
    per = {}
    for i, n in enumerate(names):
        tp, fp, fn = conf[i, i], conf[:, i].sum() - conf[i, i], conf[i, :].sum() - conf[i, i]
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per[n] = {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4),
                  "support": int(conf[i].sum())}
    present = [n for i, n in enumerate(names) if conf[i].sum() > 0]
    return {
        "n": int(len(labels)),
        "accuracy": round(float((pred == labels).mean()), 4) if len(labels) else 0.0,
        "macro_f1": round(float(np.mean([per[n]["f1"] for n in present])), 4) if present else 0.0,
        "balanced_accuracy": round(float(np.mean([per[n]["recall"] for n in present])), 4) if present else 0.0,
        "per_class": per,
        "labels": list(names),
        "confusion": conf.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence over ``n_bins`` equal-width bins.

    Examples
    --------
    >>> expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    0.0
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return round(float(ece), 4)


def quick_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and macro-F1 over the classes present (:func:`classification_report`'s).

    Examples
    --------
    >>> quick_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]))
    {'accuracy': 1.0, 'macro_f1': 1.0}
    """
    report = classification_report(probs, labels, range(np.shape(probs)[1]))
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``softmax(logits / T)`` (grid search).

    Examples
    --------
    >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    >>> 0.3 <= fit_temperature(logits, np.array([0, 0, 1, 1])) <= 10
    True
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, int)
    best, best_t = np.inf, 1.0
    for t in np.exp(np.linspace(np.log(0.25), np.log(4.0), 241)):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels]))
        if nll < best:
            best, best_t = nll, float(t)
    return round(best_t, 4)


def calibration_record(temperature: float, seed: int, fit_files) -> dict:
    """The spec's ``extra.calibration``: the temperature and how it was fitted."""
    return {
        "temperature": temperature,
        "rule": f"probs = softmax(logits / T); T minimises the NLL on half of the validation "
                f"images (numpy default_rng({seed + 1}).permutation, first half); ECE is also "
                f"reported on the other half",
        "fit_files": list(fit_files),
    }


def group_probs(probs: np.ndarray, names) -> tuple[np.ndarray, list[str]]:
    """Sum class probabilities into the 8 PBC groups (NEU, EO, BA, LY, MO, IG, ERB, PLT).

    Examples
    --------
    >>> names = ["SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT"]
    >>> g, groups = group_probs(np.full((1, 11), 1 / 11), names)
    >>> groups[0], round(float(g[0, 0]), 3), round(float(g[0, 5]), 3)
    ('NEU', 0.182, 0.273)
    """
    names = list(names)
    cols = [probs[:, [names.index(m) for m in members]].sum(1) for members in GROUPS.values()]
    return np.stack(cols, 1), list(GROUPS)
