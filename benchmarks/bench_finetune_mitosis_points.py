"""How long the mitosis fine-tune takes on a reviewer's 200 points; prints JSON.

The reviewer's day, simulated on what we have: mosaics of the AMi-Br *tune* slides' crops on
held-out H&E tissue (``train/mosaics.make_mosaics``, as ``evaluate mitosis`` builds them;
these slides never trained the bundled model) are analysed with the bundled detector, then
reviewed against the figures' known centres (7.5 µm): a detection on a figure is kept (its
class set to the figure's), one off every figure is rejected, a missed figure is added.
Mosaics are reviewed until at least ``--points`` points are written as the points CSV +
sidecar the mitosis task exports. ``finetune_mitosis`` on them is timed (2 threads); the JSON
also gives what it chose and its held-out agreement. The AMi-Br images stay in a temporary
folder.

    python benchmarks/bench_finetune_mitosis_points.py --data ../shared/data [--points 200]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def review(mosaic, table, names, radius: float) -> list[dict]:
    """The rows a reviewer leaves on one mosaic (see the module docstring)."""
    from napari_hemato.core.metrics import match_points

    det = table[["y", "x"]].to_numpy(float).reshape(-1, 2)
    pairs = match_points(mosaic.points, det, radius)["pairs"]
    on_figure = {j: i for i, j in pairs}
    rows = []
    for j, (y, x) in enumerate(det):
        if j in on_figure:
            truth = names[int(mosaic.labels[on_figure[j]])]
            prov = "model" if table["class"].iloc[j] == truth else "corrected"
            rows.append({"y_px": y, "x_px": x, "class": truth, "provenance": prov, "reviewed": True})
        else:
            rows.append({"y_px": y, "x_px": x, "class": "rejected", "provenance": "corrected",
                         "reviewed": True})
    found = {i for i, _ in pairs}
    for i, (y, x) in enumerate(mosaic.points):
        if i not in found:
            rows.append({"y_px": float(y), "x_px": float(x), "class": names[int(mosaic.labels[i])],
                         "provenance": "manual", "reviewed": True})
    return rows


def main(argv=None) -> int:
    from bench_finetune_mitosis import amibr_args

    args = amibr_args(__doc__, argv,
                      lambda p: p.add_argument("--points", type=int, default=200))
    if args is None:
        return 2
    import pandas as pd
    from skimage.io import imsave

    from napari_hemato.api import analyze
    from napari_hemato.core.spec import load_spec
    from napari_hemato.finetune.mitosis import finetune_mitosis
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train import data_mitosis as dm
    from napari_hemato.train.evaluate_mitosis import HIT_UM, split_mosaics

    base = resolve_model("mitosis", None)
    spec = load_spec(base)
    names = list(spec.class_names)
    _, _, mosaics = split_mosaics(spec, args.data, split="tune", canvas=1024, per_mosaic=8, seed=0)
    counts = {"kept": 0, "reclassed": 0, "rejected": 0, "added": 0}
    with tempfile.TemporaryDirectory(prefix="bench-ft-points-") as tmp:
        work, csvs, total = Path(tmp), [], 0
        for k, m in enumerate(mosaics):
            if total >= args.points:
                break
            image = work / f"mosaic_{k:03d}.png"
            imsave(image, m.image, check_contrast=False)
            table = analyze(image, task="mitosis", mpp=dm.CROP_MPP, out=work / f"m{k}.zarr",
                            threads=args.threads, tissue="none").table()
            rows = review(m, table, names, HIT_UM / dm.CROP_MPP)
            for r in rows:
                key = {"model": "kept", "manual": "added"}.get(r["provenance"])
                key = key or ("rejected" if r["class"] == "rejected" else "reclassed")
                counts[key] += 1
            csv = work / f"mosaic_{k:03d}_points.csv"
            pd.DataFrame(rows, columns=["y_px", "x_px", "class", "provenance", "reviewed"]).to_csv(
                csv, index=False)
            csv.with_suffix(".json").write_text(json.dumps(
                {"image_path": str(image), "mpp": dm.CROP_MPP, "region": None, "class_names": names}))
            csvs.append(csv)
            total += len(rows)
        t0 = time.perf_counter()
        result = finetune_mitosis(csvs, work / "tuned", base=base, threads=args.threads)
        wall = time.perf_counter() - t0
    out = {"model": spec.name, "threads": args.threads, "mosaics": len(csvs), "points": total,
           "review": counts, "finetune_wall_seconds": round(wall, 1),
           "finetune_minutes_reported": round(result.minutes, 2), "chosen": result.metrics["chosen"],
           "before": result.metrics["before"], "after": result.metrics["after"],
           "heldout": result.corrections.get("heldout")}
    print(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
