"""Fine-tuning the mitosis detector on a user's rejections: held-out H&E, AMi-Br recall.

The held-out parts of the mitosis-poor H&E images (``train/data_mitosis.tissue_sources``:
MICCAI image04 and image14, the bottom 38 % of CMU-1-Small-Region, the right half of the
skin image and 32 of the 107 DSB 2018 tiles; never used to train the bundled model; tune and
test tissue alike) are analysed whole with the bundled
model (threshold lowered once, so every threshold is read off one run, as
``train/evaluate_mitosis`` does). The "user" image is the held-out image with the most
detections at the model's threshold; the simulated user rejects all of them (the points CSV
export the mitosis task writes). Then ``finetune_mitosis`` (2 threads, timed) and, before
and after: detections per mm² of tissue on the OTHER held-out images, and the recall on the
held-out AMi-Br test slides (the card's mosaics, ``evaluate_detection``). Prints JSON.

    python benchmarks/bench_finetune_mitosis.py --data ../shared/data [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _report import emit

THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def held_out_counts(low_dir, data: Path, work: Path, threads: int, thresholds=THRESHOLDS) -> list[dict]:
    """Detections (score >= t) in the held-out part of each tissue image, per mm² of tissue."""
    from napari_hemato.train import data_mitosis as dm
    from napari_hemato.train.evaluate_mitosis import _analyze

    rows = []
    for src in dm.tissue_sources(data):
        path = data / src.path
        box = None
        if path.is_file():
            img = dm.read_rgb(path)
            box = dm.region_box(img.shape, src.holdout, "val")
        if box is None:
            continue
        table, seconds, result = _analyze(path, low_dir, src.mpp, work / f"{path.stem}.zarr", threads)
        y0, x0, y1, x1 = box
        yx, score = table[["y", "x"]].to_numpy(float), table["score"].to_numpy(float)
        inside = (yx[:, 0] >= y0) & (yx[:, 0] < y1) & (yx[:, 1] >= x0) & (yx[:, 1] < x1)
        mm2 = dm.tissue_mm2(img[y0:y1, x0:x1], src.mpp)
        rows.append({"key": src.key, "group": src.group, "role": src.role, "path": str(path), "mpp": src.mpp, "box": list(box),
                     "tissue_mm2": round(mm2, 4), "seconds": round(seconds, 1),
                     "n": {str(t): int((inside & (score >= t)).sum()) for t in thresholds},
                     "per_mm2": {str(t): round(int((inside & (score >= t)).sum()) / mm2, 2) for t in thresholds},
                     "_result": result, "_inside": inside, "_score": score})
    return rows


def reject_all(row: dict, threshold: float, folder: Path) -> tuple[Path, int]:
    """The user's review: every detection >= threshold in the held-out part rejected."""
    from napari_hemato.core.annotations import from_result
    from napari_hemato.tasks import get_task

    ann = from_result(row["_result"], roi=tuple(row["box"]))
    table = ann.table
    table = table[table["score"] >= threshold].reset_index(drop=True)
    table["class"], table["provenance"], table["reviewed"] = "rejected", "corrected", True
    ann.table = table
    return get_task("mitosis").export_corrections(ann, folder), len(table)


def recall(spec, low_dir, data: Path, work: Path, threads: int) -> dict:
    from napari_hemato.train.evaluate_mitosis import evaluate_detection

    work.mkdir(parents=True, exist_ok=True)

    d = evaluate_detection(spec, low_dir, data, split="test", workdir=work, canvas=1024, per_mosaic=8,
                           seed=0, threads=threads)
    return {"n_crops": d["n_crops"], "n_slides": d["n_slides"], **d["detection"],
            "fp_per_mm2_of_mosaic": round(d["fp_per_mm2_of_mosaic"], 2)}


def amibr_args(doc: str, argv, add_options) -> argparse.Namespace | None:
    """The command line of a mitosis fine-tune benchmark: ``--data``, ``--threads`` and what
    ``add_options(parser)`` adds; None (after saying so) when ``--data`` has no AMi-Br."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--threads", type=int, default=2)
    add_options(p)
    args = p.parse_args(argv)
    if not (args.data / "mitosis_ami_br" / "crops.csv").is_file():
        print(f"{args.data}: no AMi-Br data; nothing to measure", file=sys.stderr)
        return None
    return args


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path)
    p.add_argument("--lab", metavar="GROUP", default=None,
                   help="a lab's review instead of one image: every detection on the tune-role "
                        "held-out images of tissue GROUP (e.g. dsb) rejected; counted on the "
                        "test-role images")
    p.add_argument("--skip-recall", action="store_true", help="skip the AMi-Br mosaics (slow part)")


def main(argv=None) -> int:
    args = amibr_args(__doc__, argv, _options)
    if args is None:
        return 2
    data = args.data
    from napari_hemato.core.spec import load_spec
    from napari_hemato.finetune.mitosis import finetune_mitosis
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train.evaluate_mitosis import _low_threshold_copy

    base = resolve_model("mitosis", None)
    spec = load_spec(base)
    thr = float(spec.postprocess["threshold"])
    out = {"model": spec.name, "threshold": thr, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-ft-mitosis-") as tmp:
        work = Path(tmp)
        low = _low_threshold_copy(spec, work / "base_low")
        grid = tuple(sorted({*THRESHOLDS, thr}))  # the model's own threshold among them
        before = held_out_counts(low, data, work / "before", args.threads, grid)
        if args.lab:  # the lab's reviewed images: tune-role images of the group; others: test role
            users = [r for r in before if r["group"] == args.lab and r["role"] == "tune" and r["n"][str(thr)]]
            if not users:
                print(f"no detections on tune-role {args.lab} images at {thr}", file=sys.stderr)
                return 2
        else:
            users = [max(before, key=lambda r: (r["n"][str(thr)], r["tissue_mm2"]))]
        csvs, n_rejected = [], 0
        for i, user in enumerate(users):
            csv, n = reject_all(user, thr, work / f"corrections{i}")
            csvs.append(csv)
            n_rejected += n
        user_keys = {u["key"] for u in users}
        t0 = time.perf_counter()
        result = finetune_mitosis(csvs, work / "tuned", base=base, threads=args.threads, overwrite=True)
        wall = time.perf_counter() - t0
        tuned_spec = load_spec(result.folder)
        tuned_low = _low_threshold_copy(tuned_spec, work / "tuned_low")
        after = held_out_counts(tuned_low, data, work / "after", args.threads, grid)
        out["user_images"] = {"keys": sorted(user_keys), "rejected": n_rejected,
                              "scenario": f"lab: tune-role {args.lab} images" if args.lab else
                                          "the held-out image with the most detections"}
        out["finetune"] = {"wall_seconds_2_threads": round(wall, 1), "chosen": result.metrics["chosen"],
                           "before": result.metrics["before"], "after": result.metrics["after"],
                           "heldout": result.corrections["heldout"]}
        out["held_out_tissue"] = [{"key": b["key"], "group": b["group"], "role": b["role"],
                                   "user_image": b["key"] in user_keys,
                                   "tissue_mm2": b["tissue_mm2"], "before": {"n": b["n"], "per_mm2": b["per_mm2"]},
                                   "after": {"n": a["n"], "per_mm2": a["per_mm2"]}}
                                  for b, a in zip(before, after, strict=True)]
        others = [(b, a) for b, a in zip(before, after, strict=True) if b["key"] not in user_keys
                  and (not args.lab or b["role"] == "test")]
        def pooled(pairs):
            mm2 = sum(b["tissue_mm2"] for b, _ in pairs)
            return {"tissue_mm2": round(mm2, 4), "images": len(pairs), **{
                when: {str(t): round(sum(r[k]["n"][str(t)] for r in pairs) / mm2, 2) for t in grid}
                for when, k in (("before_per_mm2", 0), ("after_per_mm2", 1))}} if pairs else {}

        out["other_images_pooled"] = pooled(others)
        out["other_images_by_group"] = {g: pooled([o for o in others if o[0]["group"] == g])
                                        for g in sorted({b["group"] for b, _ in others})}
        if not args.skip_recall:
            out["amibr_test_recall"] = {"before": recall(spec, low, data, work / "rb", args.threads),
                                        "after": recall(tuned_spec, tuned_low, data, work / "ra", args.threads)}
        out["replay_mb"] = round((base / "replay.npz").stat().st_size / 1e6, 2)
    emit(out, args.json, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
