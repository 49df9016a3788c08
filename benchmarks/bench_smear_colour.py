"""The smear detector with and without its colour match, on BCCD (its own lab), on a simulated
stain and on PBC (another lab). Prints JSON.

- BCCD: box F1 per class through ``analyze`` (``train.evaluate_smear``) on the even half of
  BCCD's validation list (the fine-tune's reference fields) and the odd half, as they are;
- ``stain``: the odd half with ``bench_finetune_smear``'s simulated stain (optical density
  × 1.6 red, × 0.8 green, × 1.25 blue);
- PBC (CellaVision single-cell images of another lab; a white cell at the centre of each):
  the fraction of images whose centre pixel lies in an object the detector types WBC, on
  ``--pbc-per-class`` images of each white-cell class (PLT and ERB left out), analysed as a user
  would (no pixel size given: the red-cell ruler or the training images' 0.08 µm/px).

"Off" is the bundled model folder copied without ``preprocess.colour_match``.

    python benchmarks/bench_smear_colour.py --data ../shared/data [--pbc-per-class 12] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _report import emit
from bench_finetune_smear import lab_version

PBC_CLASSES = ("BA", "BNE", "EO", "LY", "MMY", "MO", "MY", "PMY", "SNE")


def without_colour_match(model: Path, out: Path) -> Path:
    shutil.copytree(model, out)
    spec = json.loads((out / "model.json").read_text())
    spec.get("preprocess", {}).pop("colour_match", None)
    (out / "model.json").write_text(json.dumps(spec, indent=2))
    return out


def bccd_folder(bccd: Path, stems: list[str], out: Path, lab: str | None) -> Path:
    """A BCCD-layout folder of ``stems`` (PNG bytes under the .jpg names: no second JPEG loss)."""
    from skimage.io import imsave

    from napari_hemato.train import data_smear as ds

    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        (out / sub).mkdir(parents=True)
    for stem in stems:
        image = ds.read_rgb(bccd / "JPEGImages" / f"{stem}.jpg")
        if lab:
            image = lab_version(lab, image)
        imsave(out / "JPEGImages" / f"{stem}.png", image, check_contrast=False)
        (out / "JPEGImages" / f"{stem}.png").rename(out / "JPEGImages" / f"{stem}.jpg")
        shutil.copy(bccd / "Annotations" / f"{stem}.xml", out / "Annotations")
    (out / "ImageSets" / "val.txt").write_text("\n".join(stems) + "\n")
    (out / "ImageSets" / "train.txt").write_text("")
    return out


def box_scores(model: Path, folder: Path, threads: int) -> dict:
    from napari_hemato.train.evaluate_smear import evaluate_smear

    m = evaluate_smear(model, folder, threads=threads)
    per = m["per_class"]
    f1 = {"WBC": per["WBC"]["f1"], "Platelets": per["Platelets"]["f1"],
          "RBC_annotated_regions": m["rbc_annotated_regions"]["f1"]}
    return {**f1, "objective": round(float(np.mean(list(f1.values()))), 4), "fields": m["n_images"]}


def pbc_centres(model: Path, pbc: Path, per_class: int, threads: int) -> dict:
    from napari_hemato.api import analyze
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.cells import cell_types

    rng = np.random.default_rng(0)
    found, per = 0, {}
    n = 0
    for cls in PBC_CLASSES:
        files = sorted((pbc / cls).glob("*.jpg"))
        hits = 0
        for k in rng.permutation(len(files))[:per_class]:
            with tempfile.TemporaryDirectory() as tmp:
                ann = from_result(analyze(files[k], task="smear", model=model, out=Path(tmp) / "r.zarr",
                                          threads=threads, classifier=False))
            types = dict(zip(ann.table["id"].astype(int), cell_types(ann.table).astype(str), strict=True))
            h, w = ann.labels.shape
            hits += types.get(int(ann.labels[h // 2, w // 2])) == "WBC"
        per[cls] = round(hits / per_class, 3)
        found, n = found + hits, n + per_class
    return {"centre_wbc_detected": round(found / n, 3), "images": n, "per_class": per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--pbc-per-class", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train import data_smear as ds

    bccd = args.data / "bccd"
    val = ds.split_stems(bccd)[2]
    on = resolve_model("smear", None)
    out = {"benchmark": "smear_colour_match", "threads": args.threads, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="bench-colour-") as tmp:
        tmp = Path(tmp)
        off = without_colour_match(on, tmp / "off")
        sets = {"bccd_reference_half": bccd_folder(bccd, val[::2], tmp / "ref", None),
                "bccd_test_half": bccd_folder(bccd, val[1::2], tmp / "test", None),
                "stain_test_half": bccd_folder(bccd, val[1::2], tmp / "stain", "stain")}
        for name, folder in sets.items():
            out["rows"][name] = {"off": box_scores(off, folder, args.threads),
                                 "on": box_scores(on, folder, args.threads)}
            print(name, out["rows"][name], flush=True)
        out["rows"]["pbc"] = {k: pbc_centres(m, args.data / "pbc", args.pbc_per_class, args.threads)
                              for k, m in (("off", off), ("on", on))}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
