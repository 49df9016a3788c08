"""Evaluate a mitosis model through the real runtime path (onnxruntime only, no torch).

``python -m napari_hemato.train.evaluate_mitosis MODEL_DIR --data ../shared/data``

1. Detection on held-out slides. The crops of the ``test`` slides (listed in the
   model's ``extra.validation_slides``) are pasted, 8 per canvas at random
   non-overlapping places, on 1024×1024 canvases at 0.25 µm/px whose background
   is a patchwork of 256-px windows of *held-out* negative tissue (plus 2
   crop-sized tissue "decoys" per canvas, pasted the same way; see
   :func:`napari_hemato.train.mosaics.make_mosaics`; test mosaics on test
   tissue, tune mosaics on tune tissue). Each canvas is written
   as PNG and analysed with :func:`napari_hemato.api.analyze`; detections are
   matched one-to-one to the figure centres within 7.5 µm (MIDOG criterion).
2. Normal vs atypical: accuracy and balanced accuracy of the ``class`` of the
   matched detections against the majority vote.
3. Crops alone: every crop of the held-out slides analysed as an image of its
   own (128×128 px at 0.25 µm/px, the engine pads it white): a hit is a
   detection within 7.5 µm of the crop centre (the figure), anything else is
   a false detection (the crop's other cells). This is how a held-out set of
   crops would be scored directly; it is harder on precision per area than the
   mosaics (a crop is mostly cells next to a figure) but gives the figure no
   pasted border.
4. False detections per mm² on H&E images with no mitosis labels (not verified
   mitosis-free; :func:`data_mitosis.tissue_sources`, the DSB 2018 tiles
   included): each image analysed whole at its own µm/px, detections counted
   separately in the part held out from training (``tune`` or ``test`` tissue)
   and the part used for training negatives; pooled per tissue group, and the
   test tissue's rate at the threshold that holds the tune tissue to
   :data:`FP_BUDGET_PER_MM2`.

The model is run once with its threshold lowered to 0.05; since peaks and the
global NMS do not depend on the threshold, keeping the detections with
``score >= t`` gives exactly the result at threshold ``t``, which yields the
threshold sweep for free.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_hemato.core.metrics import match_points
from napari_hemato.core.spec import ModelSpec, load_spec
from napari_hemato.train import data_mitosis as dm
from napari_hemato.train.mosaics import make_mosaics

log = logging.getLogger(__name__)

HIT_UM = 7.5
LOW_THRESHOLD = 0.05
#: false detections per mm² of mitosis-poor tissue the threshold is chosen to stay under
FP_BUDGET_PER_MM2 = 2.0
#: the threshold grid (finer at the top, where a tissue budget usually lands)
THRESHOLDS = tuple(float(t) for t in np.round(np.r_[np.arange(0.1, 0.9, 0.025),
                                                    np.arange(0.9, 0.991, 0.01)], 3))


def budget_threshold(scores, tissue_mm2: float, budget: float = FP_BUDGET_PER_MM2,
                     thresholds=THRESHOLDS) -> float:
    """The lowest threshold at which detections on tissue stay within ``budget`` per mm².

    ``scores`` are the detection scores on mitosis-poor tissue of ``tissue_mm2``
    mm² in all; ``round(budget * tissue_mm2)`` detections are allowed (on 0.46 mm²
    at 2 per mm², one). Returns the largest grid value if even that is too many.

    Examples
    --------
    >>> budget_threshold([0.95, 0.8, 0.7, 0.3], tissue_mm2=1.0, budget=2.0)
    0.725
    >>> budget_threshold([], tissue_mm2=1.0)
    0.1
    """
    scores = np.asarray(scores, float)
    for t in thresholds:
        if (scores >= t).sum() <= round(budget * tissue_mm2):
            return float(t)
    return float(thresholds[-1])


def class_scores(pairs) -> dict:
    """Accuracy and balanced accuracy of (truth, predicted) class index pairs.

    Examples
    --------
    >>> class_scores([(0, 0), (0, 0), (0, 1), (1, 1)])["class_balanced_accuracy"]
    0.8333333333333333
    """
    if len(pairs) == 0:
        return {"class_accuracy": float("nan"), "class_balanced_accuracy": float("nan")}
    p = np.asarray(pairs)
    recalls = [float((p[p[:, 0] == c, 1] == c).mean()) for c in np.unique(p[:, 0])]
    return {"class_accuracy": float((p[:, 0] == p[:, 1]).mean()),
            "class_balanced_accuracy": float(np.mean(recalls))}


def sweep(per_image: list[dict], gts: list[np.ndarray], labels: list[np.ndarray], radius: float,
          thresholds=None) -> list[dict]:
    """Detection P/R/F1 and class accuracy per threshold, pooled over images.

    ``per_image`` holds ``coords`` (n, 2), ``scores`` (n,) and ``classes`` (n,)
    detected at a low threshold; ``gts`` / ``labels`` the truth per image.
    """
    thresholds = THRESHOLDS if thresholds is None else thresholds
    rows = []
    for t in thresholds:
        tp = fp = fn = 0
        pairs = []
        for det, g, lab in zip(per_image, gts, labels, strict=True):
            keep = det["scores"] >= t
            m = match_points(g, det["coords"][keep], radius)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
            cls = det["classes"][keep]
            pairs += [(int(lab[i]), int(cls[j])) for i, j in m["pairs"]]
        row = {"threshold": float(t), "tp": tp, "fp": fp, "fn": fn,
               "precision": tp / (tp + fp) if tp + fp else 1.0,
               "recall": tp / (tp + fn) if tp + fn else 1.0,
               "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0}
        row.update(class_scores(pairs))
        rows.append(row)
    return rows


def _low_threshold_copy(spec: ModelSpec, folder: Path, precision: str = "float") -> Path:
    """A copy of the model whose ``precision`` network (the one the CPU runs in the copy)
    detects down to :data:`LOW_THRESHOLD`, for threshold sweeps."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec.onnx_path, folder / spec.onnx)
    d = spec.for_precision(precision).to_dict()
    d["postprocess"] = {**d["postprocess"], "threshold": LOW_THRESHOLD}
    if precision == "int8":
        shutil.copy2(spec.int8_path, folder / spec.int8["onnx"])
        d["int8"] = {"onnx": spec.int8["onnx"]}  # its own threshold is the low one above
    else:
        d.pop("int8", None)
    ModelSpec(**{**d, "class_names": tuple(d["class_names"])}).save(folder)
    return folder


def _analyze(path, model_dir, mpp, out, threads):
    from napari_hemato.api import analyze

    t0 = time.perf_counter()
    result = analyze(path, task="mitosis", model=model_dir, mpp=mpp, out=out, threads=threads,
                     overwrite=True)
    return result.table(), time.perf_counter() - t0, result


def _detections(table, names) -> dict:
    classes = np.asarray([names.index(c) for c in table["class"]], int)
    return {"coords": table[["y", "x"]].to_numpy(float).reshape(-1, 2),
            "scores": table["score"].to_numpy(float), "classes": classes,
            "p_atypical": table["prob_atypical"].to_numpy(float)}


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties counted half)."""
    pos, neg = score[truth == 1], score[truth == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def split_mosaics(spec: ModelSpec, data_dir, *, split: str, canvas: int, per_mosaic: int,
                  seed: int):
    """``(slides, crops, mosaics)``: the AMi-Br crops of the ``split`` slides (the model's
    recorded validation slides, else the default split) pasted on held-out tissue."""
    frame = dm.read_crops_table(data_dir)
    slides = spec.extra.get("validation_slides", {}).get(split)
    if slides is None:
        slides = dm.split_slides(frame["slide"], frame["dataset"])[split]
    frame = frame[frame["slide"].isin(slides)].reset_index(drop=True)
    crops = dm.load_crops(frame, mpp=dm.CROP_MPP)
    tissue = [t.image for t in dm.tissue_regions(data_dir, part=split, mpp=dm.CROP_MPP)]
    if not tissue:  # a folder without the negative tissue: the other held-out part, else white
        tissue = [t.image for t in dm.tissue_regions(data_dir, part="val", mpp=dm.CROP_MPP)]
    mosaics = make_mosaics(crops, tissue, size=canvas, per_mosaic=per_mosaic, decoys=2,
                           block=256, seed=seed)
    return slides, crops, mosaics


def evaluate_detection(spec, low_dir, data_dir, *, split, workdir, canvas, per_mosaic, seed,
                       threads) -> dict:
    """Mosaics of the ``split`` slides' crops, analysed and matched (see module docstring)."""
    slides, crops, mosaics = split_mosaics(spec, data_dir, split=split, canvas=canvas,
                                           per_mosaic=per_mosaic, seed=seed)
    from skimage.io import imsave

    dets, seconds = [], []
    for i, m in enumerate(mosaics):
        path = workdir / f"mosaic_{split}_{i:03d}.png"
        imsave(path, m.image, check_contrast=False)
        table, dt, _ = _analyze(path, low_dir, dm.CROP_MPP, workdir / f"m{i}.zarr", threads)
        dets.append(_detections(table, list(spec.class_names)))
        seconds.append(dt)
    radius = HIT_UM / dm.CROP_MPP
    gts, labels = [m.points for m in mosaics], [m.labels for m in mosaics]
    rows = sweep(dets, gts, labels, radius)
    thr = float(spec.postprocess.get("threshold", 0.5))
    at = sweep(dets, gts, labels, radius, thresholds=[thr])[0]
    # atypical details on the matched detections at the model's threshold
    truth, pred, p_at, ds = [], [], [], []
    name_to_ds = dict(zip(crops.names, crops.datasets, strict=True))
    per_ds: dict[str, list[int]] = {}
    for det, m in zip(dets, mosaics, strict=True):
        keep = det["scores"] >= thr
        match = match_points(m.points, det["coords"][keep], radius)
        hit = np.zeros(len(m.points), bool)
        for i, j in match["pairs"]:
            hit[i] = True
            truth.append(int(m.labels[i]))
            pred.append(int(det["classes"][keep][j]))
            p_at.append(float(det["p_atypical"][keep][j]))
            ds.append(name_to_ds[m.crop_names[i]])
        for i, name in enumerate(m.crop_names):
            per_ds.setdefault(str(name_to_ds[name]), []).append(int(hit[i]))
    truth_a, pred_a = np.asarray(truth, int), np.asarray(pred, int)
    conf = [[int(((truth_a == a) & (pred_a == b)).sum()) for b in (0, 1)] for a in (0, 1)]
    area_mm2 = len(mosaics) * (canvas * dm.CROP_MPP / 1000) ** 2
    return {
        "split": split, "slides": list(slides), "n_slides": len(slides), "n_crops": len(crops),
        "n_atypical": int(crops.labels.sum()), "n_mosaics": len(mosaics),
        "canvas_px": canvas, "canvas_mpp": dm.CROP_MPP, "per_mosaic": per_mosaic,
        "hit_radius_um": HIT_UM, "threshold": thr,
        "detection": {k: at[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")},
        "fp_per_mm2_of_mosaic": at["fp"] / area_mm2,
        "recall_by_dataset": {k: float(np.mean(v)) for k, v in sorted(per_ds.items())},
        "atypical": {"n_matched": len(truth), "accuracy": at["class_accuracy"],
                     "balanced_accuracy": at["class_balanced_accuracy"],
                     "confusion_rows_truth_cols_pred": conf, "classes": list(spec.class_names),
                     "auc_prob_atypical": _auc(truth_a, np.asarray(p_at))},
        "best_threshold_on_this_set": max(rows, key=lambda r: r["f1"]),
        "sweep": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                  for r in rows],
        "seconds_per_mosaic": float(np.mean(seconds)) if seconds else float("nan"),
    }


def evaluate_crops(spec, low_dir, data_dir, *, split, workdir, threads) -> dict:
    """Each held-out crop analysed alone (see module docstring, item 3)."""
    frame = dm.read_crops_table(data_dir)
    slides = spec.extra.get("validation_slides", {}).get(split)
    if slides is None:
        slides = dm.split_slides(frame["slide"], frame["dataset"])[split]
    frame = frame[frame["slide"].isin(slides)].sort_values("file").reset_index(drop=True)
    names = list(spec.class_names)
    dets, gts, labels = [], [], []
    for i, row in enumerate(frame.itertuples()):
        table, _, _ = _analyze(row.path, low_dir, dm.CROP_MPP, workdir / f"c{i}.zarr", threads)
        dets.append(_detections(table, names))
        gts.append(np.array([[64.0, 64.0]]))  # the figure is at pixel (64, 64) of a 128-px crop
        labels.append(np.array([int(row.majority_atypical)]))
        shutil.rmtree(workdir / f"c{i}.zarr", ignore_errors=True)
    radius = HIT_UM / dm.CROP_MPP
    thr = float(spec.postprocess.get("threshold", 0.5))
    at = sweep(dets, gts, labels, radius, thresholds=[thr])[0]
    rows = sweep(dets, gts, labels, radius)
    top_hit = [bool(len(d["scores"])) and bool(np.hypot(*(d["coords"][int(np.argmax(d["scores"]))]
                                                          - 64.0)) <= radius) for d in dets]
    return {"split": split, "n_crops": len(frame), "n_slides": len(slides), "threshold": thr,
            "detection": {k: at[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")},
            "fp_per_crop": at["fp"] / max(len(frame), 1),
            "top_detection_is_the_figure": float(np.mean(top_hit)) if top_hit else float("nan"),
            "atypical_class_accuracy": at["class_accuracy"],
            "atypical_class_balanced_accuracy": at["class_balanced_accuracy"],
            "best_threshold_on_this_set": max(rows, key=lambda r: r["f1"]),
            "sweep": [{k: r[k] for k in ("threshold", "tp", "fp", "fn", "recall")} for r in rows]}


def _rate(scores: np.ndarray, mm2: float, t: float) -> float | None:
    return int((scores >= t).sum()) / mm2 if mm2 else None


def evaluate_tissue(spec, low_dir, data_dir, *, workdir, threads,
                    thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> dict:
    """False detections per mm² of tissue on unlabelled H&E images (see module docstring).

    Every source of :func:`data_mitosis.tissue_sources` is analysed whole; the
    detections are counted in its held-out part (``tune`` or ``test`` tissue, by
    its role) and in its training part. Pooled per role, per tissue group of the
    test tissue, and as a sweep over :data:`THRESHOLDS`; ``budget`` is the lowest
    threshold holding the *tune* tissue to :data:`FP_BUDGET_PER_MM2` and the test
    tissue's rate there (how a model would do with its threshold set that way).
    """
    thr = float(spec.postprocess.get("threshold", 0.5))
    images = []
    pools: dict[str, list] = {}  # name -> [scores arrays, mm2]
    for src in dm.tissue_sources(data_dir):
        path = Path(data_dir) / src.path
        img = dm.read_rgb(path)
        table, dt, result = _analyze(path, low_dir, src.mpp, workdir / "t.zarr", threads)
        shutil.rmtree(workdir / "t.zarr", ignore_errors=True)
        yx, score = table[["y", "x"]].to_numpy(float), table["score"].to_numpy(float)
        row = {"key": src.key, "group": src.group, "path": src.path, "mpp": src.mpp,
               "mpp_source": src.mpp_note, "holdout_rule": src.holdout, "shape": list(img.shape[:2]),
               "seconds": round(dt, 2),
               "work_megapixels": round(float(np.prod(result.grid.shape)) / 1e6, 2)}
        for part in ("val", "train"):
            box = dm.region_box(img.shape, src.holdout, part)
            if box is None:
                continue
            y0, x0, y1, x1 = box
            inside = (yx[:, 0] >= y0) & (yx[:, 0] < y1) & (yx[:, 1] >= x0) & (yx[:, 1] < x1)
            mm2 = dm.tissue_mm2(img[y0:y1, x0:x1], src.mpp)
            name = src.role if part == "val" else "trained"
            s_in = score[inside]
            row[name] = {"box": list(box), "tissue_mm2": round(mm2, 5), "n": int((s_in >= thr).sum()),
                         "per_mm2_tissue": _rate(s_in, mm2, thr),
                         "per_mm2_at": {str(t): _rate(s_in, mm2, t) for t in thresholds},
                         "top_scores": [round(float(v), 3) for v in np.sort(s_in)[::-1][:5]]}
            for key in (name, f"{name}/{src.group}"):
                pool = pools.setdefault(key, [[], 0.0])
                pool[0].append(s_in)
                pool[1] += mm2
        images.append(row)

    def summary(scores, mm2):
        sc = np.concatenate(scores) if scores else np.zeros(0)
        return {"n": int((sc >= thr).sum()), "tissue_mm2": round(mm2, 4),
                "per_mm2_tissue": _rate(sc, mm2, thr),
                "per_mm2_at": {str(t): _rate(sc, mm2, t) for t in thresholds}}

    pooled = {k: summary(*v) for k, v in sorted(pools.items())}
    out = {"threshold": thr, "note": "unlabelled H&E, not verified mitosis-free", "pooled": pooled,
           "images": images}
    if "tune" in pools and "test" in pools:
        tune_sc, tune_mm2 = np.concatenate(pools["tune"][0]), pools["tune"][1]
        test_sc, test_mm2 = np.concatenate(pools["test"][0]), pools["test"][1]
        t_b = budget_threshold(tune_sc, tune_mm2)
        out["budget"] = {"per_mm2": FP_BUDGET_PER_MM2, "tune_threshold": t_b,
                         "test_per_mm2_at_it": _rate(test_sc, test_mm2, t_b),
                         "test_sweep": {str(t): _rate(test_sc, test_mm2, t) for t in THRESHOLDS}}
    tested = [r for r in images if "test" in r and r["test"]["tissue_mm2"] > 0]
    if tested:
        worst = max(tested, key=lambda r: (r["test"]["per_mm2_tissue"], r["test"]["tissue_mm2"]))
        out["worst_test_image"] = {"key": worst["key"], "group": worst["group"], **worst["test"]}
    return out


def evaluate_mitosis(model_dir, data_dir, *, split: str = "test", canvas: int = 1024,
                     per_mosaic: int = 8, seed: int = 0, threads: int | None = 2,
                     tissue: bool = True, crops: bool = True, workdir=None,
                     precision: str = "auto") -> dict:
    """Held-out detection, atypical classification and tissue false detections, of the
    network the CPU runs (``precision`` ``auto``: the int8 one when the model has it, at its
    own threshold) or the one named.

    Parameters
    ----------
    model_dir : path
        Model folder (``model.onnx`` + ``model.json``).
    data_dir : path
        ``../shared/data`` (or a folder with ``crops.csv`` in the AMi-Br layout).
    split : {"test", "tune"}
        Which held-out slides to paste into the mosaics.

    Returns
    -------
    dict
        ``detection`` (mosaics, see module docstring), ``crops`` (each crop alone),
        ``tissue`` and ``model``.

    Examples
    --------
    >>> m = evaluate_mitosis("models/bundled/mitosis", "../shared/data")  # doctest: +SKIP
    >>> m["detection"]["detection"]["f1"]  # doctest: +SKIP
    """
    from napari_hemato.models.onnx_backend import resolve_precision

    full = load_spec(model_dir)
    precision = resolve_precision(full, precision, "cpu")
    spec = full.for_precision(precision)
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hemato-mitosis-eval-") if own_tmp else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        low = _low_threshold_copy(full, workdir / "model_low", precision)
        out = {"model": {"name": spec.name, "version": spec.version, "mpp": spec.mpp,
                         "weights": precision,
                         "threshold": spec.postprocess.get("threshold"), "tile": spec.tile,
                         "halo": spec.halo, "onnx_mb": round(spec.onnx_path.stat().st_size / 1e6, 2)},
               "detection": evaluate_detection(spec, low, data_dir, split=split, workdir=workdir,
                                               canvas=canvas, per_mosaic=per_mosaic, seed=seed,
                                               threads=threads)}
        if crops:
            out["crops"] = evaluate_crops(spec, low, data_dir, split=split, workdir=workdir,
                                          threads=threads)
        if tissue:
            out["tissue"] = evaluate_tissue(spec, low, data_dir, workdir=workdir, threads=threads)
        return out
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    """Command line: evaluate a model folder and print the metrics as JSON."""
    p = argparse.ArgumentParser(prog="napari_hemato.train.evaluate_mitosis")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model folder (or --model)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled mitosis model)")
    p.add_argument("--data", required=True, help="../shared/data")
    p.add_argument("--split", default="test", choices=("test", "tune"))
    p.add_argument("--canvas", type=int, default=1024)
    p.add_argument("--per-mosaic", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-tissue", action="store_true")
    p.add_argument("--no-crops", action="store_true", help="skip the crop-by-crop evaluation")
    p.add_argument("--save", help="also write the JSON to this file")
    p.add_argument("--precision", choices=("auto", "float", "int8"), default="auto",
                   help="network to evaluate (default auto: the int8 one when the model has it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from napari_hemato.models.registry import resolve_model

    model = resolve_model("mitosis", a.model or a.model_pos)
    metrics = evaluate_mitosis(model, a.data, split=a.split, canvas=a.canvas,
                               per_mosaic=a.per_mosaic, seed=a.seed, threads=a.threads,
                               tissue=not a.no_tissue, crops=not a.no_crops,
                               precision=a.precision)
    text = json.dumps(metrics, indent=2, default=float) + "\n"
    if a.save:
        Path(a.save).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
