"""Fine-tuning the smear cell detector on a lab's corrected fields: the lab's held-out fields and
the reference fields, before and after. Prints JSON.

We have no annotated smear fields from another lab, so each "lab" is BCCD changed the way
labs differ, applied alike to its corrections and its test fields:

- ``stain``: another Romanowsky stain (optical density × 1.6 red, × 0.8 green, × 1.25 blue:
  bluer, darker cells);
- ``blur``: another microscope's optics (Gaussian blur σ 1.5 px at 0.08 µm/px) and JPEG q 60;
- ``same``: the fields as they are (a lab like ours).

**The corrections.** The lab reviews the base model's *tune* fields (every 8th of BCCD's
training list; never trained on, they chose the post-processing) as a person does in the
viewer: every annotated cell as its box's pseudo-mask with its class (BCCD gives boxes, not
masks; ``train.data_smear``), every red cell the model found where BCCD annotated none kept,
every other detection deleted. Exported as label TIFFs with their fields, as the Review dock
exports them, then ``finetune smear`` (timed).

**The tests.** The lab's test fields are the odd-numbered half of BCCD's validation list in
the lab's version (the even half is the reference the fine-tune guards, shipped in its replay);
both models are scored through ``analyze`` (``train.evaluate_smear``: box IoU ≥ 0.5 per class),
the reference on the even half as it is.

    python benchmarks/bench_finetune_smear.py --data ../shared/data [--lab stain] [--fields 25] [--json OUT]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import emit

LABS = ("stain", "blur", "same")
STAIN_OD = (1.6, 0.8, 1.25)
BLUR_SIGMA, BLUR_JPEG = 1.5, 60
MPP = 0.08


def lab_version(lab: str, image: np.ndarray) -> np.ndarray:
    """The field as the lab's stain or microscope would show it."""
    if lab == "stain":
        od = -np.log(np.clip(image.astype(np.float64), 1, 255) / 255.0)
        return np.clip(np.round(255 * np.exp(-od * np.array(STAIN_OD))), 0, 255).astype(np.uint8)
    if lab == "blur":
        from imagecodecs import jpeg8_decode, jpeg8_encode
        from scipy import ndimage as ndi

        blurred = ndi.gaussian_filter(image.astype(np.float64), (BLUR_SIGMA, BLUR_SIGMA, 0))
        blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
        return np.asarray(jpeg8_decode(jpeg8_encode(blurred, level=BLUR_JPEG)))
    return image


def reviewed(stem: str, bccd: Path, image_path: Path, threads: int):
    """The base model's result on a field as a reviewer leaves it: ``(labels, classes)``."""
    from napari_hemato.api import analyze
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.cells import cell_types
    from napari_hemato.train import data_smear as ds

    gt = ds.load_bccd_sample(bccd, stem, mpp=MPP, targets=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = analyze(image_path, task="smear", mpp=MPP, threads=threads, out=Path(tmp) / "r.zarr",
                         classifier=False)
        pred = from_result(result)
    labels = gt.labels.astype(np.int64).copy()
    classes = {int(i): ds.CLASS_NAMES[int(c)] for i, c in enumerate(gt.classes) if i and c >= 0}
    types = dict(zip(pred.table["id"].astype(int), cell_types(pred.table).astype(str), strict=True))
    fg = labels > 0
    nxt = int(labels.max()) + 1
    kept = 0
    for i, kind in types.items():
        mask = pred.labels == i
        area = int(mask.sum())
        # a red cell where BCCD annotated nothing: the reviewer keeps it
        if kind == "RBC" and area and (mask & fg).sum() < 0.2 * area:
            labels[mask & ~fg] = nxt
            classes[nxt] = "RBC"
            nxt, kept = nxt + 1, kept + 1
    return labels, classes, kept


def write_lab(lab: str, bccd: Path, out: Path, n_fields: int, threads: int) -> tuple[Path, dict]:
    """The lab's corrected tune fields as exports in ``out/exports`` and its test fields as a
    BCCD-layout folder ``out/test``."""
    import pandas as pd
    from skimage.io import imsave

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.export.formats import export_annotations
    from napari_hemato.train import data_smear as ds

    _, tune, val = ds.split_stems(bccd)
    (out / "images").mkdir(parents=True)
    counts = {"fields": 0, "cells": 0, "model_rbc_kept": 0}
    for stem in tune[:n_fields]:
        image = lab_version(lab, ds.read_rgb(bccd / "JPEGImages" / f"{stem}.jpg"))
        path = out / "images" / f"{stem}.png"
        imsave(path, image, check_contrast=False)
        labels, classes, kept = reviewed(stem, bccd, path, threads)
        ids = np.array(sorted(classes), np.int64)
        names = [classes[i] for i in ids]
        table = pd.DataFrame({"id": ids, "class": names, "cell_type": names, "confidence": 1.0,
                              "provenance": "manual", "reviewed": True})
        ann = AnnotationSet("instances", table, list(ds.CLASS_NAMES), labels.astype(np.uint32), (0, 0),
                            MPP, str(path), labels.shape)
        export_annotations(ann, out / "exports", ["tiff"], name=stem)
        counts["fields"] += 1
        counts["cells"] += len(ids)
        counts["model_rbc_kept"] += kept
    test = out / "test"
    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        (test / sub).mkdir(parents=True)
    stems = val[1::2]
    for stem in stems:
        image = lab_version(lab, ds.read_rgb(bccd / "JPEGImages" / f"{stem}.jpg"))
        imsave(test / "JPEGImages" / f"{stem}.jpg", image, quality=95, check_contrast=False)
        shutil.copy(bccd / "Annotations" / f"{stem}.xml", test / "Annotations" / f"{stem}.xml")
    (test / "ImageSets" / "val.txt").write_text("\n".join(stems) + "\n")
    (test / "ImageSets" / "train.txt").write_text("")
    return out / "exports", counts


def reference_folder(bccd: Path, out: Path) -> Path:
    """The even half of BCCD's validation list (the replay's reference fields) as a BCCD folder."""
    from napari_hemato.train import data_smear as ds

    stems = ds.read_split(bccd, "val")[::2]
    ref = out / "reference"
    (ref / "ImageSets").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (ref / sub).symlink_to(bccd / sub)
    (ref / "ImageSets" / "val.txt").write_text("\n".join(stems) + "\n")
    (ref / "ImageSets" / "train.txt").write_text("")
    return ref


def scores(model: Path | None, folder: Path, threads: int) -> dict:
    from napari_hemato.train.evaluate_smear import evaluate_smear

    m = evaluate_smear(model or "bundled", folder, threads=threads)
    per = m["per_class"]
    return {"WBC_f1": per["WBC"]["f1"], "Platelets_f1": per["Platelets"]["f1"], "RBC_f1": per["RBC"]["f1"],
            "RBC_annotated_regions_f1": m["rbc_annotated_regions"]["f1"],
            "objective": round(float(np.mean([per["WBC"]["f1"], per["Platelets"]["f1"],
                                               m["rbc_annotated_regions"]["f1"]])), 4),
            "platelets": {k: per["Platelets"][k] for k in ("tp", "fp", "fn")},
            "fields": m["n_images"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--lab", choices=LABS, action="append")
    p.add_argument("--fields", type=int, default=25, help="corrected tune fields (at most 25)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from napari_hemato.finetune.smear import finetune_smear
    from napari_hemato.models.registry import resolve_model

    bccd = args.data / "bccd"
    base = resolve_model("smear", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-smear-") as tmp:
        tmp = Path(tmp)
        reference = reference_folder(bccd, tmp)
        ref_before = scores(base, reference, args.threads)
        for lab in args.lab or LABS:
            exports, counts = write_lab(lab, bccd, tmp / lab, args.fields, args.threads)
            t0 = time.perf_counter()
            result = finetune_smear([exports], tmp / lab / "model", threads=args.threads)
            seconds = time.perf_counter() - t0
            test = tmp / lab / "test"
            rows.append({
                "lab": lab, "corrections": counts, "finetune_seconds": round(seconds, 1),
                "chosen": {k: result.metrics["chosen"][k] for k in ("l2", "share")},
                "heldout_score": [result.metrics["before"]["heldout_score"],
                                  result.metrics["after"]["heldout_score_of_the_split_fit"]],
                "lab_test_before": scores(base, test, args.threads),
                "lab_test_after": scores(result.folder, test, args.threads),
                "reference_before": ref_before,
                "reference_after": scores(result.folder, reference, args.threads),
            })
            print(rows[-1], flush=True)
    emit({"benchmark": "finetune_smear", "threads": args.threads, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
