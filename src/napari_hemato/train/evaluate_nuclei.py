"""Evaluate (and tune the post-processing of) the nucleus model on its held-out split.

The held-out images are read from the model's own ``model.json``
(``extra.validation_images``: data key + pixel size), so evaluation uses
exactly the images training never saw. Each image is resampled to the model's
µm/px, run untiled through onnxruntime, post-processed with
:func:`~napari_hemato.core.postprocess.postprocess_instances`, and its labels
are mapped back (nearest) to the image's own grid, where they are scored
against the expert labels.

No torch needed: numpy, scikit-image, onnxruntime.

Usage::

    python -m napari_hemato.train.evaluate_nuclei --model MODEL_DIR --data ../shared/data \\
        [--tune] [--out MODEL_DIR/metrics.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from napari_hemato.core.metrics import (
    aggregated_jaccard_index,
    instance_f1,
    match_instances,
    mean_average_precision,
)
from napari_hemato.core.postprocess import postprocess_instances
from napari_hemato.core.spec import ModelSpec, load_spec
from napari_hemato.train import data_nuclei as dn

log = logging.getLogger("napari_hemato.train.evaluate_nuclei")

TUNING_GRID = {
    "threshold": (0.4, 0.5, 0.6, 0.7),
    "min_distance_um": (1.5, 2.0, 2.5, 3.0, 4.0),
    "seed_threshold": (0.1, 0.3, 0.5, 0.7),
    "min_area_um2": (2.0, 4.0, 8.0),
}
#: seeds from h-maxima of the distance map instead of peaks min_distance_um apart
TUNING_GRID_H = {
    "threshold": (0.4, 0.5, 0.6, 0.7),
    "seed_h": (0.1, 0.15, 0.2, 0.3),
    "seed_threshold": (0.1, 0.3, 0.5),
    "min_area_um2": (2.0, 4.0, 8.0),
}


def _session(spec: ModelSpec, threads: int, precision: str = "float"):
    import onnxruntime as ort

    from napari_hemato.core.spec import check_weights

    path = check_weights(spec, precision)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_maps(spec: ModelSpec, session, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, distance) maps of one uint8 RGB image already at ``spec.mpp``."""
    h, w = image.shape[:2]
    div = spec.size_divisor
    padded = np.pad(
        image, ((0, (-h) % div), (0, (-w) % div), (0, 0)), constant_values=spec.pad_value
    )
    names = [spec.outputs["foreground"], spec.outputs["distance"]]
    fg, dist = session.run(names, {spec.input_name: spec.normalize(padded[None])})
    return fg[0, 0, :h, :w], dist[0, 0, :h, :w]


def validation_entries(spec: ModelSpec, which: str = "validation") -> list[dict]:
    """The model's ``extra.validation_images`` (or ``extra.tune_images``: ``which="tune"``)."""
    entries = spec.extra.get(f"{which}_images")
    if not entries:
        raise ValueError(f"model {spec.name!r}: model.json has no extra.{which}_images")
    return list(entries)


def _predict_all(spec: ModelSpec, data_dir: Path, threads: int, which: str = "validation",
                 precision: str = "float"):
    """Per listed image: key, mpp, original image shape, gt labels, maps on model grid."""
    session = _session(spec, threads, precision)
    out = []
    for entry in validation_entries(spec, which):
        key, mpp = entry["key"], float(entry["mpp"])
        source, stem = key.split("/", 1)
        img, gt = dn.read_pair(Path(data_dir) / source / f"{stem}.png")
        small, small_gt = dn.to_model_grid(img, gt, mpp, spec.mpp)
        fg, dist = run_maps(spec, session, small)
        out.append({"key": key, "mpp": mpp, "gt": gt, "gt_model": small_gt, "fg": fg, "dist": dist})
    return out


def evaluate_both(model_dir: str | Path, data_dir: str | Path, *, threads: int = 2) -> dict:
    """:func:`evaluate_nuclei` of the network the CPU runs; with an int8 network, the float
    one's ``pooled`` and ``by_source`` scores beside it (``float_weights``)."""
    metrics = evaluate_nuclei(model_dir, data_dir, threads=threads)
    if metrics["weights"] == "int8":
        ref = evaluate_nuclei(model_dir, data_dir, threads=threads, precision="float")
        metrics["float_weights"] = {"pooled": ref["pooled"], "by_source": ref["by_source"]}
    return metrics


def _summary(rows: list[dict]) -> dict:
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    fn = sum(r["fn"] for r in rows)
    return {
        "n_images": len(rows),
        "n_gt": int(sum(r["n_gt"] for r in rows)),
        "precision": round(tp / max(tp + fp, 1), 4),
        "recall": round(tp / max(tp + fn, 1), 4),
        "f1": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
        "f1_mean": round(float(np.mean([r["f1"] for r in rows])), 4),
        "aji_mean": round(float(np.mean([r["aji"] for r in rows])), 4),
        "map_mean": round(float(np.mean([r["map"] for r in rows])), 4),
    }


def evaluate_nuclei(model_dir: str | Path, data_dir: str | Path, *, threads: int = 2,
                    precision: str = "auto") -> dict:
    """Score the model on its held-out images (see module docstring), with the network the
    CPU runs (``precision`` ``auto``: the int8 one when the model has it) or the one named.

    Returns
    -------
    dict
        ``pooled`` (F1/precision/recall from pooled counts at IoU 0.5; AJI
        and mAP 0.5:0.95 averaged over images), ``by_source`` (same per data
        source), ``per_image`` rows and the ``postprocess`` used.

    Examples
    --------
    >>> m = evaluate_nuclei("models/bundled/nuclei", "../shared/data")  # doctest: +SKIP
    >>> m["pooled"]["f1"]  # doctest: +SKIP
    """
    from napari_hemato.models.onnx_backend import resolve_precision

    spec = load_spec(model_dir)
    precision = resolve_precision(spec, precision, "cpu")
    rows = []
    for item in _predict_all(spec, Path(data_dir), threads, precision=precision):
        pred = postprocess_instances(spec.postprocess, spec.mpp, item["fg"], item["dist"])
        pred = dn.labels_to_original(pred, item["gt"].shape)
        gt = item["gt"]
        f = instance_f1(gt, pred, 0.5)
        rows.append(
            {
                "key": item["key"],
                "source": item["key"].split("/", 1)[0],
                "mpp": item["mpp"],
                "n_gt": int(len(np.unique(gt)) - (gt == 0).any()),
                "n_pred": int(len(np.unique(pred)) - (pred == 0).any()),
                "tp": f["tp"],
                "fp": f["fp"],
                "fn": f["fn"],
                "precision": round(f["precision"], 4),
                "recall": round(f["recall"], 4),
                "f1": round(f["f1"], 4),
                "aji": round(aggregated_jaccard_index(gt, pred), 4),
                "map": round(mean_average_precision(gt, pred), 4),
            }
        )
    by_source = {
        s: _summary([r for r in rows if r["source"] == s])
        for s in sorted({r["source"] for r in rows})
    }
    return {
        "model": spec.name,
        "version": spec.version,
        "weights": precision,
        "split": "held-out validation images listed in model.json extra.validation_images",
        "grid": "predicted at spec.mpp, labels mapped back (nearest) to each image's own grid",
        "postprocess": dict(spec.postprocess),
        "pooled": _summary(rows),
        "by_source": by_source,
        "per_image": rows,
    }


def _score(items: list[dict], pp: dict, mpp: float) -> tuple[float, dict]:
    """Tuning objective on the model grid: mean over sources of (F1@0.5 + mean AJI) / 2."""
    per_source: dict[str, list] = {}
    for it in items:
        pred = postprocess_instances(pp, mpp, it["fg"], it["dist"])
        m = match_instances(it["gt_model"], pred)
        aji = aggregated_jaccard_index(it["gt_model"], pred)
        per_source.setdefault(it["key"].split("/", 1)[0], []).append((m.tp, m.fp, m.fn, aji))
    scores = {}
    for s, vals in per_source.items():
        tp, fp, fn = (sum(v[i] for v in vals) for i in range(3))
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        scores[s] = 0.5 * (f1 + float(np.mean([v[3] for v in vals])))
    return float(np.mean(list(scores.values()))), scores


def tune_postprocess(
    model_dir: str | Path, data_dir: str | Path, *, grid: dict | None = None, threads: int = 1
) -> dict:
    """Grid-search ``postprocess`` on the model's tune images; write the best into model.json.

    The tune images (``extra.tune_images``) were neither trained on nor are
    scored by :func:`evaluate_nuclei`. Older models without them are tuned on
    their validation images, and ``extra.postprocess_tuning.images`` says so.
    Both seed rules are searched (:data:`TUNING_GRID`: distance peaks;
    :data:`TUNING_GRID_H`: h-maxima) unless ``grid`` is given.

    Returns the chosen parameters (also recorded in ``extra.postprocess_tuning``).
    """
    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    which = "tune" if spec.extra.get("tune_images") else "validation"
    if which == "validation":
        log.warning("%s has no tune images: tuning on the validation images (optimistic metrics)",
                    model_dir)
    items = _predict_all(spec, Path(data_dir), threads, which)
    grids = [grid] if grid else [TUNING_GRID, TUNING_GRID_H]
    best, best_score, best_parts = None, -1.0, {}
    for g in grids:
        names = list(g)
        for values in itertools.product(*(g[n] for n in names)):
            pp = dict(zip(names, values, strict=True))
            score, parts = _score(items, pp, spec.mpp)
            if score > best_score:
                best, best_score, best_parts = pp, score, parts
    log.info("tuned postprocess %s: score %.4f %s", best, best_score, best_parts)
    raw = json.loads((model_dir / "model.json").read_text())
    raw["postprocess"] = best
    raw.setdefault("extra", {})["postprocess_tuning"] = {
        "objective": "mean over sources of (pooled F1@0.5 + mean AJI) / 2, on the model grid",
        "images": f"extra.{which}_images",
        "grid": [{k: list(v) for k, v in g.items()} for g in grids],
        "score": round(best_score, 4),
        "by_source": {k: round(v, 4) for k, v in best_parts.items()},
    }
    (model_dir / "model.json").write_text(json.dumps(raw, indent=2) + "\n")
    load_spec(model_dir)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.evaluate_nuclei")
    p.add_argument("--model", required=True, help="model folder (model.onnx + model.json)")
    p.add_argument("--data", required=True, help="data folder (../shared/data layout)")
    p.add_argument("--tune", action="store_true", help="tune postprocess first and save it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "float", "int8"), default="auto",
                   help="network to score (default auto: the int8 one when the model has it)")
    p.add_argument("--out", default=None, help="metrics JSON (default MODEL/metrics.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.tune:
        tune_postprocess(args.model, args.data, threads=args.threads)
    if args.precision == "auto":
        metrics = evaluate_both(args.model, args.data, threads=args.threads)
    else:
        metrics = evaluate_nuclei(args.model, args.data, threads=args.threads,
                                  precision=args.precision)
    out = Path(args.out) if args.out else Path(args.model) / "metrics.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("pooled %s", metrics["pooled"])
    for s, v in metrics["by_source"].items():
        log.info("%s %s", s, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
