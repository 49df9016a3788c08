"""Evaluate the WBC classifier on its held-out split, through the runtime path (no torch).

Everything goes through :meth:`CellClassifier.classify_crops` (onnxruntime,
diameter estimated from each image) exactly as the plugin runs it:
per-class precision / recall / F1, accuracy, macro-F1, 11x11 confusion
(rows = truth), the 8-group view of the PBC paper (NEU = SNE + BNE,
IG = MMY + MY + PMY; group probability = sum of member probabilities),
expected calibration error (15 bins), accuracy on the same images rescaled
x2.2 and x0.7 (scale-invariance evidence), speed, and an other-laboratory
check on the BCCD ``WBC`` boxes.

BCCD has no subtype labels. ``bccd_wbc_groups.csv`` (beside this module)
gives each of its 301 WBC boxes a *group* (NEU, EO, LY, MO) or ``?``, assigned
by a napari-hemato developer from the images (not by a haematologist; 39
boxes left ``?`` — smudged, blurred or ambiguous cells). It is reported as
group accuracy on BCCD's own train/val image lists: a coarse, non-expert
measure of how the classifier transfers to another lab, stain and camera.

Run ``python -m napari_hemato.train.evaluate_wbc --data ../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from napari_hemato.train.data_coarse import BCCD_GROUPS_CSV, GROUPS, FieldCells
from napari_hemato.train.wbc_metrics import (
    classification_report,
    expected_calibration_error,
    group_probs,
)

log = logging.getLogger(__name__)


def _rescale(image: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(8, round(w * factor)), max(8, round(h * factor)))
    method = Image.Resampling.BICUBIC if factor > 1 else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(image).resize(size, method))


BCCD_GROUPS = ("NEU", "EO", "LY", "MO")


def evaluate_bccd_groups(clf, bccd: Path, labels_csv: Path = BCCD_GROUPS_CSV, *,
                         batch_size: int = 64) -> dict:
    """Group accuracy of ``clf`` on the labelled BCCD WBC boxes (see the module docstring).

    Each box is classified in its field (centre = box centre, diameter = mean
    box side, as :class:`~napari_hemato.train.data_coarse.FieldCells`); the
    prediction is the 8-group argmax, so a white cell called IG, ERB, PLT or
    BA counts as wrong. Returns, per BCCD split and for all images: ``n``,
    ``accuracy``, ``balanced_accuracy`` (mean recall over the labelled groups)
    and a confusion matrix (rows = the 4 labelled groups, columns = 8
    predicted groups).
    """
    import pandas as pd

    cells = FieldCells(labels_csv, Path(bccd) / "JPEGImages")
    table = cells.table.copy()
    names = list(clf.spec.class_names)
    pred = np.empty(len(table), object)
    for image, rows in table.groupby("image", sort=True):
        idx = rows.index.to_numpy()
        probs, _ = clf.classify_in_image(cells.fields[str(image)], cells.centres[idx],
                                         cells.diameters[idx], batch_size=batch_size)
        gp, gnames = group_probs(np.asarray(probs), names)
        pred[idx] = np.asarray(gnames, object)[gp.argmax(1)]
    table["pred"] = pred
    out = {}
    for part, sub in (("all", table), *sorted(table.groupby("split"))):
        conf = pd.crosstab(pd.Categorical(sub["group"], BCCD_GROUPS),
                           pd.Categorical(sub["pred"], list(GROUPS)), dropna=False)
        recalls = [float((sub["pred"][sub["group"] == g] == g).mean())
                   for g in BCCD_GROUPS if (sub["group"] == g).any()]
        out[part] = {
            "n": int(len(sub)),
            "accuracy": round(float((sub["group"] == sub["pred"]).mean()), 4),
            "balanced_accuracy": round(float(np.mean(recalls)), 4),
            "confusion": {"rows": list(BCCD_GROUPS), "columns": list(GROUPS),
                          "counts": conf.to_numpy().tolist()},
        }
    out["labels"] = ("developer-assigned groups from the images (not expert); "
                     f"{Path(labels_csv).name}, boxes labelled '?' excluded")
    return out


def _bccd_boxes(bccd: Path) -> list[tuple[Path, list[tuple[float, float, float]]]]:
    """Per BCCD image: WBC boxes as (cy, cx, diameter = mean box side)."""
    out = []
    for xml in sorted((bccd / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        cells = []
        for obj in root.iter("object"):
            if (obj.findtext("name") or "").strip() != "WBC":
                continue
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (float(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            cells.append(((y0 + y1) / 2, (x0 + x1) / 2, ((x1 - x0) + (y1 - y0)) / 2))
        img = bccd / "JPEGImages" / (root.findtext("filename") or f"{xml.stem}.jpg")
        if cells and img.is_file():
            out.append((img, cells))
    return out


def _resolve_dirs(data_dir: Path, bccd_dir) -> tuple[Path, Path | None]:
    data_dir = Path(data_dir)
    pbc = data_dir / "pbc" if (data_dir / "pbc").is_dir() else data_dir
    if bccd_dir is None:
        for cand in (data_dir / "bccd", data_dir.parent / "bccd"):
            if (cand / "Annotations").is_dir():
                bccd_dir = cand
                break
    return pbc, (Path(bccd_dir) if bccd_dir else None)


def evaluate_wbc(model_dir=None, data_dir="../shared/data", *, bccd_dir=None, threads: int = 2,
                 batch_size: int = 64, scales=(2.2, 0.7)) -> dict:
    """Evaluate a WBC model folder on the validation files its spec records.

    Parameters
    ----------
    model_dir : path, optional
        Model folder (default: the bundled ``wbc`` model).
    data_dir : path
        The PBC class folders, or a folder holding ``pbc/`` (and ``bccd/``).
    bccd_dir : path, optional
        BCCD folder (``Annotations/``, ``JPEGImages/``); found beside ``pbc``
        when omitted; skipped when absent.
    threads : int
        onnxruntime intra-op threads.

    Returns
    -------
    dict
        JSON-ready metrics (see the module docstring).

    Examples
    --------
    >>> m = evaluate_wbc(None, "../shared/data")  # doctest: +SKIP
    >>> m["validation"]["accuracy"], m["speed"]["cells_per_s"]  # doctest: +SKIP
    """
    from napari_hemato.models.cell_classifier import CellClassifier, estimate_cell_diameter
    from napari_hemato.train.data_wbc import list_samples, load_rgb

    pbc, bccd = _resolve_dirs(Path(data_dir), bccd_dir)
    clf = CellClassifier(model_dir, threads=threads)
    spec = clf.spec
    names = list(spec.class_names)
    files = list(spec.extra.get("split", {}).get("validation_files", []))
    if not files:
        raise ValueError(f"{spec.folder}: model.json records no validation_files (extra.split)")
    listing = list_samples(pbc)
    known = dict(zip(listing["path"], listing["class"], strict=True))
    missing = [f for f in files if f not in known]
    if missing:
        raise FileNotFoundError(f"{pbc}: {len(missing)} validation image(s) of the spec not found, e.g. {missing[0]}")
    labels = np.array([names.index(known[f]) for f in files])
    images = [load_rgb(pbc / f) for f in files]
    log.info("evaluating %s on %d held-out images from %s", spec.name, len(files), pbc)

    t0 = time.perf_counter()
    probs, cams = clf.classify_crops(images, batch_size=batch_size)
    t_full = time.perf_counter() - t0
    report = classification_report(probs, labels, names)
    report["ece_15_bins"] = expected_calibration_error(probs, labels)
    calib = spec.extra.get("calibration") or {}
    if calib.get("fit_files"):
        fitted = set(calib["fit_files"])
        other = np.array([f not in fitted for f in files])
        report["calibration"] = {
            "temperature": calib.get("temperature"),
            "ece_15_bins_half_not_used_for_fitting": expected_calibration_error(probs[other], labels[other]),
            "n_half_not_used_for_fitting": int(other.sum()),
            "note": "the temperature was fitted on the other half of the validation images; "
                    "ece_15_bins above covers all of them",
        }
    report["mean_confidence"] = round(float(probs.max(1).mean()), 4)
    gp, gnames = group_probs(probs, names)
    glabels = np.array([gnames.index(next(g for g, m in GROUPS.items() if names[y] in m)) for y in labels])
    grouped = classification_report(gp, glabels, gnames)
    grouped["rule"] = "group probability = sum of member class probabilities; argmax"
    grouped["ece_15_bins"] = expected_calibration_error(gp, glabels)

    # CAM sanity: share of CAM mass inside the cell's disc (d/2 around the crop centre)
    inside = []
    for img, cam in zip(images[:400], cams[:400], strict=False):
        h, w = img.shape[:2]
        d = estimate_cell_diameter(img)
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (d / 2) ** 2
        if cam.sum() > 0:
            inside.append(float(cam[disc].sum() / cam.sum()))
    cam_check = {"n": len(inside), "mean_cam_mass_in_cell_disc": round(float(np.mean(inside)), 4) if inside else None,
                 "note": "disc of the estimated diameter around the crop centre; PBC images are 180x182 "
                         "and cells ~60-80 px, so the disc is ~15 % of the image"}

    sources_x1 = dict(clf.scale.sources)
    scale_rows = {"1.0": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                          "balanced_accuracy": report["balanced_accuracy"],
                          "group8_accuracy": grouped["accuracy"], "window_sources": sources_x1}}
    pred1 = probs.argmax(1)
    for s in scales:
        scaled = [_rescale(im, s) for im in images]
        clf.scale.sources.clear()
        p, _ = clf.classify_crops(scaled, batch_size=batch_size)
        r = classification_report(p, labels, names)
        g = classification_report(group_probs(p, names)[0], glabels, gnames)
        scale_rows[str(s)] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                              "balanced_accuracy": r["balanced_accuracy"],
                              "window_sources": dict(clf.scale.sources),
                              "group8_accuracy": g["accuracy"],
                              "agreement_with_x1": round(float((p.argmax(1) == pred1).mean()), 4),
                              "image_size": list(scaled[0].shape[:2])}
        log.info("scale x%s: %s", s, scale_rows[str(s)])

    # classify-cells' default for a folder: one pooled red-cell reading (a sample of the images)
    pooled_row = None
    if clf.scale.mode == "red-cell":
        from napari_hemato.models.window_scale import pool_sample

        reading = clf.pooled_mpp([images[i] for i in pool_sample(len(images))])
        if reading.ok:
            p, _ = clf.classify_crops(images, mpp=reading.mpp, batch_size=batch_size)
            r = classification_report(p, labels, names)
            pooled_row = {"mpp": round(reading.mpp, 5), "n_sampled": reading.n_read,
                          "spread": round(reading.spread, 4), "accuracy": r["accuracy"],
                          "balanced_accuracy": r["balanced_accuracy"], "macro_f1": r["macro_f1"],
                          "agreement_with_per_image_ruler": round(float((p.argmax(1) == pred1).mean()), 4),
                          "what": "classify-cells' default (--ruler pooled): the median ruler reading "
                                  "of an even sample of the images is every image's pixel size"}
            log.info("pooled ruler: %s", json.dumps(pooled_row))

    # speed: known diameters (crop + resize + inference + CAM), then with diameter estimation
    sub = images[: min(len(images), 640)]
    diam = [estimate_cell_diameter(im) for im in sub]
    clf.classify_crops(sub[:batch_size], diam[:batch_size], batch_size=batch_size)
    t0 = time.perf_counter()
    clf.classify_crops(sub, diam, batch_size=batch_size)
    t_known = time.perf_counter() - t0
    speed = {"threads": threads, "batch_size": batch_size, "input_size": spec.input_size,
             "cells_per_s": round(len(sub) / t_known, 1),
             "cells_per_s_with_diameter_estimation": round(len(files) / t_full, 1),
             "what": "classify_crops on 180x182 PBC crops: window crop + resize + onnxruntime + CAM "
                     "upsampling; the second figure includes segmenting each cell for its diameter"}

    out = {
        "model": {"name": spec.name, "version": spec.version, "fingerprint": spec.fingerprint,
                  "input_size": spec.input_size, "context": clf.context,
                  "scale": clf.scale.as_preprocess()},
        "data": {"pbc": str(pbc), "n_validation": len(files),
                 "split_rule": spec.extra.get("split", {}).get("rule"),
                 "note": "held-out split recorded in model.json; PBC has no patient ids, so images of "
                         "one patient may sit in both splits"},
        "validation": report,
        "group8": grouped,
        "cross_scale": {"rule": "validation images rescaled (bicubic up, Lanczos down), diameters "
                                "(and, red-cell scale, the red-cell ruler) re-estimated; PBC cells ~60-80 px at x1, ~130-180 px at x2.2",
                        "by_scale": scale_rows},
        "cam_check": cam_check,
        **({"validation_pooled_ruler": pooled_row} if pooled_row else {}),
        "speed": speed,
    }

    if bccd is not None and (bccd / "Annotations").is_dir():
        counts = dict.fromkeys(names, 0)
        n = 0
        t0 = time.perf_counter()
        for img_path, cells in _bccd_boxes(bccd):
            field = load_rgb(img_path)
            c = np.array([[cy, cx] for cy, cx, _ in cells])
            d = np.array([dd for _, _, dd in cells])
            p, _ = clf.classify_in_image(field, c, d, batch_size=batch_size)
            for k in p.argmax(1):
                counts[names[int(k)]] += 1
            n += len(cells)
        t_bccd = time.perf_counter() - t0
        grouped_counts = {g: sum(counts[m] for m in members) for g, members in GROUPS.items()}
        out["bccd_sanity"] = {
            "n_wbc_boxes": n, "predicted": counts, "predicted_group8": grouped_counts,
            "cells_per_s_in_fields": round(n / t_bccd, 1) if t_bccd else None,
            "note": "predicted class distribution over all BCCD WBC boxes (different lab, stain "
                    "and camera); centre = box centre, diameter = mean box side",
        }
        clf.scale.sources.clear()
        out["bccd_groups"] = evaluate_bccd_groups(clf, bccd, batch_size=batch_size)
        out["bccd_groups"]["window_sources"] = dict(clf.scale.sources)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate, write ``MODEL/metrics.json`` and print the JSON on stdout."""
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.evaluate_wbc")
    p.add_argument("--model", default=None, help="model folder (default: bundled wbc model)")
    p.add_argument("--data", default="../shared/data", help="PBC class folders, or a folder with pbc/ and bccd/")
    p.add_argument("--bccd", default=None, help="BCCD folder (default: beside pbc/)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="metrics JSON (default MODEL/metrics.json; '-' for none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    metrics = evaluate_wbc(args.model, args.data, bccd_dir=args.bccd, threads=args.threads,
                           batch_size=args.batch_size)
    text = json.dumps(metrics, indent=2) + "\n"
    if args.out != "-":
        from napari_hemato.models.registry import resolve_model

        out = Path(args.out) if args.out else resolve_model("wbc", args.model) / "metrics.json"
        out.write_text(text)
        log.info("wrote %s", out)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
