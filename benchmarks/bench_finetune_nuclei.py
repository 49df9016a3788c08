"""Fine-tuning the nucleus segmenter on a lab's corrected masks: the lab's held-out images and
the reference validation set, before and after. Prints JSON.

We have no nucleus masks from another lab, so each "lab" is the reference data changed the
way labs differ, applied alike to its corrections and its test images:

- ``wider``: the lab draws every nucleus 1 µm wider (its masks include the rim; annotation
  conventions differ this much between public nucleus sets);
- ``stain``: the lab's stain: haematoxylin × 2, eosin × 0.3 (HED space);
- ``same``: the reference images as they are (a lab like ours).

The lab corrects the base model's *tune* images (10 DSB 2018 + MICCAI image10; never used
for gradient steps, they chose the epoch and the post-processing), exported as label TIFFs
with their images as the Review dock exports them, and fine-tunes (``finetune nuclei``,
``--threads`` threads, timed). The lab's test images are the base model's 23 held-out
validation images in the lab's version; the reference is the same 23 as they are
(``evaluate nuclei``). Both models are scored with their float network and with the int8 one
the CPU runs by default (the refit is written into both).

    python benchmarks/bench_finetune_nuclei.py --data ../shared/data [--lab wider] [--images 11] [--json OUT]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import emit

LABS = ("wider", "stain", "same")
WIDER_UM = 1.0
STAIN = (2.0, 0.3)  # haematoxylin, eosin factors


def lab_version(lab: str, image: np.ndarray, labels: np.ndarray, mpp: float):
    """The image and labels as the lab would have them."""
    if lab == "wider":
        from skimage.segmentation import expand_labels

        return image, expand_labels(labels, WIDER_UM / mpp)
    if lab == "stain":
        from skimage.color import hed2rgb, rgb2hed

        hed = rgb2hed(image[..., :3])
        hed[..., 0] *= STAIN[0]
        hed[..., 1] *= STAIN[1]
        return np.clip(np.round(hed2rgb(hed) * 255), 0, 255).astype(np.uint8), labels
    return image, labels


def write_lab(lab: str, data: Path, spec, out: Path, n_images: int) -> tuple[Path, int]:
    """The lab's corrected tune images as exports in ``out/exports`` and its test images as a
    reference-shaped folder ``out/test``; returns (exports folder, nuclei corrected)."""
    import pandas as pd
    import tifffile
    from skimage.io import imsave

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.export.formats import export_annotations
    from napari_hemato.train import data_nuclei as dn

    (out / "images").mkdir(parents=True)
    nuclei = 0
    for entry in spec.extra["tune_images"][:n_images]:
        source, stem = entry["key"].split("/", 1)
        image, labels = dn.read_pair(data / source / f"{stem}.png")
        image, labels = lab_version(lab, image, labels, float(entry["mpp"]))
        path = out / "images" / f"{stem[:16]}.png"
        imsave(path, image, check_contrast=False)
        ids = np.unique(labels)
        ids = ids[ids > 0]
        nuclei += len(ids)
        table = pd.DataFrame({"id": ids, "class": "nucleus", "cell_type": "nucleus", "confidence": 1.0,
                              "provenance": "manual", "reviewed": True})
        ann = AnnotationSet("instances", table, ["nucleus"], labels.astype(np.uint32), (0, 0),
                            float(entry["mpp"]), str(path), labels.shape)
        export_annotations(ann, out / "exports", ["tiff"], name=stem[:16])
    for entry in spec.extra["validation_images"]:
        source, stem = entry["key"].split("/", 1)
        image, labels = dn.read_pair(data / source / f"{stem}.png")
        image, labels = lab_version(lab, image, labels, float(entry["mpp"]))
        (out / "test" / source).mkdir(parents=True, exist_ok=True)
        imsave(out / "test" / source / f"{stem}.png", image, check_contrast=False)
        tifffile.imwrite(out / "test" / source / f"{stem}_label.tif", labels.astype(np.uint16))
    return out / "exports", nuclei


def scores(model: Path, data: Path, threads: int, precision: str = "float") -> dict:
    from napari_hemato.train.evaluate_nuclei import evaluate_nuclei

    m = evaluate_nuclei(model, data, threads=threads, precision=precision)
    worst = min(m["per_image"], key=lambda r: r["f1"])
    return {**{k: m["pooled"][k] for k in ("f1", "aji_mean", "map_mean", "precision", "recall")},
            "worst_image": {"key": worst["key"], "f1": worst["f1"]}}


def run_lab(lab: str, data: Path, base: Path, spec, work: Path, n_images: int, threads: int) -> dict:
    from napari_hemato.finetune.nuclei import finetune_nuclei

    exports, nuclei = write_lab(lab, data, spec, work / lab, n_images)
    t0 = time.perf_counter()
    result = finetune_nuclei([exports], work / lab / "model", base=base, threads=threads)
    seconds = time.perf_counter() - t0
    out = {"lab": lab, "corrected_images": min(n_images, len(spec.extra["tune_images"])),
           "corrected_nuclei": nuclei, "finetune_seconds": round(seconds, 1),
           "chosen": {k: result.metrics["chosen"][k] for k in ("l2", "share")},
           "note": result.metrics["after"].get("note"),
           "finetune_metrics": {"before": result.metrics["before"], "after": result.metrics["after"]}}
    for name, model in (("before", base), ("after", result.folder)):
        out[f"lab_test_{name}"] = scores(model, work / lab / "test", threads)
        out[f"reference_{name}"] = scores(model, data, threads)
        # the int8 network the CPU runs by default carries the same refit
        out[f"lab_test_{name}_int8"] = scores(model, work / lab / "test", threads, "int8")
        out[f"reference_{name}_int8"] = scores(model, data, threads, "int8")
    shutil.rmtree(work / lab, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--lab", choices=LABS, action="append", help="default: all three")
    p.add_argument("--images", type=int, default=11, help="tune images the lab corrects (at most 11)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.data / "nuclei_dsb2018_brightfield").is_dir():
        print(f"{args.data}: no nuclei_dsb2018_brightfield (needs ../shared/data)")
        return 2
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.registry import resolve_model

    base = resolve_model("nuclei", None)
    spec = load_spec(base)
    out = {"model": spec.name, "version": spec.version, "threads": args.threads, "labs": []}
    with tempfile.TemporaryDirectory(prefix="bench-ft-nuclei-") as tmp:
        for lab in args.lab or LABS:
            out["labs"].append(run_lab(lab, args.data, base, spec, Path(tmp), args.images, args.threads))
    emit(out, args.json, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
