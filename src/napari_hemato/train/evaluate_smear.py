"""Evaluate a smear cell model on held-out BCCD fields through the real runtime path.

Every validation image goes through :func:`napari_hemato.api.analyze` (engine
tiling, resampling to the model's µm/px, watershed post-processing, object
table); each predicted object's level-0 bounding box is matched one-to-one to
the VOC boxes of its class at IoU ≥ 0.5. onnxruntime only: no torch import.

BCCD leaves many red cells unannotated, so RBC precision against the
annotated boxes counts real, unannotated cells as false positives. Besides the
plain per-class metrics, ``rbc_annotated_regions`` scores RBCs only against
predictions that overlap some annotated box (IoU ≥ 0.1 with any box of any
class); it is an optimistic bound, reported for context only.

Usage::

    python -m napari_hemato.train.evaluate_smear --model MODEL_DIR --data bccd/ [--mpp 0.08]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_hemato.core.metrics import box_scores
from napari_hemato.core.metrics import prf as metrics_prf
from napari_hemato.train import data_smear as ds

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5


def prf(tp: int, fp: int, fn: int) -> dict:
    """:func:`napari_hemato.core.metrics.prf` with rates rounded to 4 decimals."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics_prf(tp, fp, fn).items()}


def score_image(gt_boxes: list[ds.Box], pred_boxes: np.ndarray, pred_classes: np.ndarray) -> dict:
    """Per-class ``tp, fp, fn`` (+ RBC in annotated regions) of one image."""
    gt = np.array([b.yxyx for b in gt_boxes], np.float64).reshape(-1, 4)
    return box_scores(gt, [b.cls for b in gt_boxes], pred_boxes, pred_classes, ds.CLASS_NAMES,
                      iou_threshold=IOU_THRESHOLD, partly_annotated="RBC")


def table_boxes(table) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 boxes and detector classes (RBC / WBC / Platelets) of a smear table.

    With the WBC stage on, ``class`` holds a white cell's subtype (SNE, LY, ...);
    the detector's call is then in ``cell_type``.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"bbox_y0": [0], "bbox_x0": [0], "bbox_y1": [9], "bbox_x1": [9],
    ...                   "class": ["SNE"], "cell_type": ["WBC"]})
    >>> table_boxes(t)[1].tolist()
    ['WBC']
    """
    boxes = table[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]].to_numpy(np.float64)
    kind = table["cell_type"] if "cell_type" in table else table["class"]
    return boxes.reshape(-1, 4), kind.astype(str).to_numpy()


def evaluate_smear(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    mpp: float = ds.BCCD_MPP,
    split: str = "val",
    limit: int | None = None,
    threads: int | None = 2,
    out_dir: str | Path | None = None,
) -> dict:
    """Box-level metrics of a smear model on a BCCD split, run through the engine.

    Parameters
    ----------
    model_dir : path
        Model folder (``model.onnx`` + ``model.json``).
    data_dir : path
        BCCD-layout folder (``JPEGImages/``, ``Annotations/``, ``ImageSets/``).
    mpp : float
        Pixel size assumed for the BCCD fields (passed to the engine).
    split : str
        Image set to score (``val``: never seen in training).
    limit : int, optional
        Score only the first ``limit`` images (smoke tests).
    threads : int, optional
        onnxruntime intra-op threads.
    out_dir : path, optional
        Where result stores go (a temporary folder by default).

    Returns
    -------
    dict
        ``per_class`` (P, R, F1 at IoU 0.5 with tp/fp/fn), ``counts``
        (predicted vs annotated totals and mean absolute per-image error),
        ``rbc_annotated_regions``, ``macro_f1``, ``seconds_per_image`` and the
        settings used.

    Examples
    --------
    >>> m = evaluate_smear("models/bundled/smear", "../shared/data/bccd")  # doctest: +SKIP
    >>> m["per_class"]["WBC"]["f1"]
    """
    from napari_hemato.api import analyze

    data_dir = Path(data_dir)
    stems = ds.read_split(data_dir, split)[: limit or None]
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hemato-smear-eval-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    totals = {k: {"tp": 0, "fp": 0, "fn": 0} for k in (*ds.CLASS_NAMES, "RBC_annotated_regions")}
    count_err = {k: [] for k in ds.CLASS_NAMES}
    counts = {k: {"predicted": 0, "annotated": 0} for k in ds.CLASS_NAMES}
    times = []
    per_image = []
    try:
        for stem in stems:
            _, gt = ds.parse_voc(data_dir / "Annotations" / f"{stem}.xml")
            t0 = time.perf_counter()
            result = analyze(data_dir / "JPEGImages" / f"{stem}.jpg", task="smear", model=model_dir,
                             mpp=mpp, threads=threads, out=out_dir / f"{stem}.zarr", overwrite=True)
            table = result.table()
            times.append(time.perf_counter() - t0)
            boxes, classes = table_boxes(table)
            s = score_image(gt, boxes, classes)
            for k, v in s.items():
                for c in ("tp", "fp", "fn"):
                    totals[k][c] += v[c]
            for k in ds.CLASS_NAMES:
                counts[k]["predicted"] += s[k]["n_pred"]
                counts[k]["annotated"] += s[k]["n_gt"]
                count_err[k].append(abs(s[k]["n_pred"] - s[k]["n_gt"]))
            per_image.append({"image": stem, **{k: {c: s[k][c] for c in ("tp", "fp", "fn")}
                                                 for k in ds.CLASS_NAMES}})
            log.info("%s: %s", stem, {k: (s[k]["n_pred"], s[k]["n_gt"]) for k in ds.CLASS_NAMES})
    finally:
        if tmp is not None:
            tmp.cleanup()
    per_class = {k: prf(**totals[k]) for k in ds.CLASS_NAMES}
    for k in ds.CLASS_NAMES:
        counts[k]["mean_abs_error_per_image"] = round(float(np.mean(count_err[k])), 3) if stems else None
    warm = times[1:] if len(times) > 1 else times
    return {
        "split": split,
        "n_images": len(stems),
        "iou_threshold": IOU_THRESHOLD,
        "mpp_assumed": mpp,
        "per_class": per_class,
        "macro_f1": round(float(np.mean([per_class[k]["f1"] for k in ds.CLASS_NAMES])), 4),
        "rbc_f1_all_annotated_boxes": per_class["RBC"]["f1"],
        "rbc_annotated_regions": prf(**totals["RBC_annotated_regions"]),
        "counts": counts,
        "seconds_per_image": round(float(np.median(warm)), 3) if warm else None,
        "per_image": per_image,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: print the metrics as JSON (and optionally save them)."""
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.evaluate_smear",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (model.onnx + model.json)")
    p.add_argument("--data", required=True, help="BCCD-layout folder")
    p.add_argument("--mpp", type=float, default=ds.BCCD_MPP, help="assumed µm/px of the fields")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    metrics = evaluate_smear(args.model, args.data, mpp=args.mpp, split=args.split,
                             limit=args.limit, threads=args.threads)
    text = json.dumps(metrics, indent=2) + "\n"
    if args.save:
        Path(args.save).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
