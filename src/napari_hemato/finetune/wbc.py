"""Fine-tune the white-cell classifier on a user's corrected cells, without torch.

1. Read the corrections: the crops export (``manifest.csv``; reviewed or corrected
   rows) or class folders of single-cell images (the 11 classes, or the coarse groups
   NEU, LY, MO, EO, BA, IG taken as "any of its members").
2. Embed every cell with the model itself (its ``embedding`` output: the pooled
   features its linear head reads), preprocessed exactly as at run time.
3. Refit the head (:func:`napari_hemato.finetune.head.fit_head`) on the corrections
   plus the model's replay set (reference embeddings shipped beside it in
   ``replay.npz``, never images), anchored to the shipped head. The anchor and the
   corrections' share are chosen on a held-out fifth of the corrections, among the
   settings that keep the reference validation accuracy within one point.
4. Write the refit head into a copy of the ONNX graph (the CAM follows: it reads the
   same weights): an ordinary model folder for ``--model``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.classes import allowed_classes
from napari_hemato.core.errors import HematoError
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.common import FinetuneResult, Progress, begin, finish, search_settings
from napari_hemato.finetune.head import Head, fit_head
from napari_hemato.finetune.replay import load_replay
from napari_hemato.io.cell_images import list_cell_images, load_rgb

#: (anchor l2, corrections' share of the loss) tried, most conservative first
SETTINGS = [(l2, share) for l2 in (1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3) for share in (0.5, 0.8)]
MAX_REFERENCE_DROP = 0.01


def read_corrections(data: list[str | Path]) -> dict:
    """Every corrected cell in ``data``: ``images``, ``diameters`` (crop px or None),
    ``labels`` (class or group), ``sources`` (folder of each)."""
    out = {"images": [], "diameters": [], "labels": [], "sources": []}
    for folder in data:
        folder = Path(folder)
        df = list_cell_images(folder, groups=True)
        if df["reviewed"].notna().any() or df["provenance"].notna().any():
            # the crops export: the model's own unreviewed calls are not corrections
            keep = df["reviewed"].fillna(False).astype(bool) | df["provenance"].isin(["corrected", "manual"])
            df = df[keep]
        if df.empty:
            raise HematoError(f"{folder}: no reviewed or corrected cells (review some, then export crops)")
        for path, label, diameter, side in zip(df["path"], df["class"], df["diameter_px"],
                                               df["crop_side"], strict=True):
            image = load_rgb(folder / path)
            d = float(diameter)
            if np.isfinite(d) and np.isfinite(side) and side > 0:
                d *= image.shape[1] / float(side)  # level-0 px -> crop px
            out["images"].append(image)
            out["diameters"].append(d if np.isfinite(d) and d > 0 else None)
            out["labels"].append(str(label))
            out["sources"].append(str(folder))
    return out


def _accuracy(head: Head, x: np.ndarray, allowed: np.ndarray) -> float:
    """Share of samples whose top class is one their label allows."""
    if not len(x):
        return float("nan")
    top = head.probs(x).argmax(1)
    return float(allowed[np.arange(len(x)), top].mean())


def _balanced_accuracy(head: Head, x: np.ndarray, y: np.ndarray) -> float:
    top = head.probs(x).argmax(1)
    return float(np.mean([np.mean(top[y == c] == c) for c in np.unique(y)]))


def _holdout(labels: list[str], fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """A seeded, per-label held-out mask (at least one per label with >= 3 cells)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    labels = np.asarray(labels)
    for label in sorted(set(labels)):
        idx = np.flatnonzero(labels == label)
        if len(idx) >= 3:
            held[rng.permutation(idx)[: max(1, int(round(fraction * len(idx))))]] = True
    return held


def _fit(x, allowed, replay, init: Head, l2: float, share: float) -> Head:
    rx, ry = replay["train_x"], replay["train_y"]
    r_allowed = np.eye(init.weight.shape[0], dtype=bool)[ry]
    weights = np.r_[np.full(len(x), share / max(len(x), 1)), np.full(len(rx), (1 - share) / len(rx))]
    return fit_head(np.r_[x, rx], np.r_[allowed, r_allowed], init, sample_weight=weights, l2=l2)


def finetune_wbc(data: list[str | Path], out: str | Path, *, base: str | Path | None = None,
                 max_minutes: float = 2.0, progress: Progress | None = None, overwrite: bool = False,
                 threads: int | None = None) -> FinetuneResult:
    """Fine-tune the WBC classifier ``base`` (default: bundled) on corrected cells in ``data``.

    ``data``: crops exports (their reviewed or corrected rows) or class folders of
    single-cell images; the steps are the module's, the keywords
    :func:`napari_hemato.api.finetune`'s.

    Examples
    --------
    >>> finetune_wbc(["my_crops"], "my_wbc_model")  # doctest: +SKIP
    FinetuneResult(folder=PosixPath('my_wbc_model'), ...)
    """
    from napari_hemato.models.cell_classifier import CellClassifier

    progress, base_folder = begin("wbc", base, progress)
    corr = read_corrections([Path(d) for d in data])
    clf = CellClassifier(base_folder, threads=threads)
    if not clf.has_embedding:
        raise HematoError(f"{base_folder}: model {clf.spec.name!r} has no 'embedding' output "
                          "(napari_hemato.finetune.embedding.add_embedding_output adds it)")
    names = list(clf.spec.class_names)
    allowed = allowed_classes(corr["labels"], names)
    replay = load_replay(base_folder, clf)
    model = onnx_edit.load(clf.spec.onnx_path)
    spot = onnx_edit.find_linear_head(model)
    init = Head(onnx_edit.initializer(model, spot.weight).astype(np.float64),
                onnx_edit.initializer(model, spot.bias).astype(np.float64), spot.temperature)

    n = len(corr["images"])
    xs = []
    for start in range(0, n, 64):
        progress(f"embedding cells {start}/{n}", 0.05 + 0.45 * start / max(n, 1))
        xs.append(clf.embed_crops(corr["images"][start : start + 64], corr["diameters"][start : start + 64])[1])
    x = np.concatenate(xs).astype(np.float64)
    held = _holdout(corr["labels"])
    ref_x, ref_y = replay["val_x"], replay["val_y"]
    ref_allowed = np.eye(len(names), dtype=bool)[ref_y]
    before = {"reference_accuracy": _accuracy(init, ref_x, ref_allowed),
              "reference_balanced_accuracy": _balanced_accuracy(init, ref_x, ref_y),
              "heldout_accuracy": _accuracy(init, x[held], allowed[held]),
              "corrections_accuracy": _accuracy(init, x, allowed)}

    def scores(l2: float, share: float) -> dict:
        head = _fit(x[~held], allowed[~held], replay, init, l2, share)
        return {"heldout_accuracy": _accuracy(head, x[held], allowed[held]),
                "reference_accuracy": _accuracy(head, ref_x, ref_allowed)}

    tried, best = search_settings(
        SETTINGS, scores, score="heldout_accuracy", what="head", progress=progress,
        max_minutes=max_minutes,
        keeps=lambda row: row["reference_accuracy"] >= before["reference_accuracy"] - MAX_REFERENCE_DROP)
    if best is None:  # no setting kept the reference accuracy: the most conservative one
        best = tried[0]
    progress("refitting on every correction", 0.92)
    final = _fit(x, allowed, replay, init, best["l2"], best["share"])
    after = {"reference_accuracy": _accuracy(final, ref_x, ref_allowed),
             "reference_balanced_accuracy": _balanced_accuracy(final, ref_x, ref_y),
             "heldout_accuracy_of_the_split_fit": best["heldout_accuracy"],
             "corrections_accuracy": _accuracy(final, x, allowed)}
    if after["reference_accuracy"] < before["reference_accuracy"] - MAX_REFERENCE_DROP:
        final = _fit(x[~held], allowed[~held], replay, init, best["l2"], best["share"])
        after["reference_accuracy"] = _accuracy(final, ref_x, ref_allowed)
        after["note"] = "the refit on every correction dropped the reference accuracy: the split fit is written"

    onnx_edit.set_initializer(model, spot.weight, final.weight)
    onnx_edit.set_initializer(model, spot.bias, final.bias)
    counts = {label: int(c) for label, c in zip(*np.unique(corr["labels"], return_counts=True), strict=True)}
    corrections = {"sources": sorted(set(corr["sources"])), "cells": n, "per_label": counts,
                   "heldout_cells": int(held.sum())}
    metrics = {"before": before, "after": after, "settings_tried": tried, "chosen": best,
               "reference": replay["description"]}
    return finish(out, base_folder, clf.spec, model, corrections=corrections, metrics=metrics,
                  method="head refit on the model's own embeddings (napari_hemato.finetune.wbc)",
                  card=lambda stamp, minutes: _card(clf.spec, corrections, metrics, stamp, minutes),
                  progress=progress, overwrite=overwrite)


def _card(spec, corrections: dict, metrics: dict, stamp: str, minutes: float) -> str:
    b, a, c = metrics["before"], metrics["after"], metrics["chosen"]
    per_label = ", ".join(f"{k} {v}" for k, v in corrections["per_label"].items())
    rows = "\n".join(f"| {t['l2']:g} | {t['share']:.1f} | {t['heldout_accuracy']:.3f} | "
                     f"{t['reference_accuracy']:.3f} |" for t in metrics["settings_tried"])
    return f"""# Model card: `{spec.name}-finetuned` (from `{spec.name}` {spec.version})

**Research use only**, like its base model (see the base model's card for its data,
training and intended use). Fine-tuned on {stamp} in {minutes:.1f} min by
`napari-hemato finetune wbc` (head refit on the model's own embeddings; the trunk is
unchanged).

## Corrections used
{corrections['cells']} cells ({per_label}) from: {', '.join(corrections['sources'])}.
A coarse group (NEU, IG, ...) counts as "any of its members". A seeded fifth of each label
({corrections['heldout_cells']} cells) was held out to choose the settings.

## Metrics
| | before | after |
|---|---|---|
| held-out corrections, accuracy | {b['heldout_accuracy']:.3f} | {a['heldout_accuracy_of_the_split_fit']:.3f} (fit without them) |
| reference validation ({metrics['reference']}), accuracy | {b['reference_accuracy']:.3f} | {a['reference_accuracy']:.3f} |
| reference validation, class-balanced accuracy | {b['reference_balanced_accuracy']:.3f} | {a['reference_balanced_accuracy']:.3f} |

The written head is refit on every correction with the chosen setting (anchor l2
{c['l2']:g}, corrections' share {c['share']:.1f}); settings tried (a setting may drop
the reference accuracy by at most {MAX_REFERENCE_DROP:.0%}):

| anchor l2 | corrections' share | held-out corrections | reference |
|---|---|---|---|
{rows}

With few corrections the held-out numbers rest on a handful of cells: read them as a check,
not as a measurement of the new lab's accuracy.
"""
