"""``napari-hemato finetune``: a model fitted to your corrections, in minutes, without torch."""

from __future__ import annotations

import sys

from napari_hemato.cli._util import out, positive_float
from napari_hemato.finetune import FINETUNERS


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on your corrections (base install, no torch, minutes)",
        description="Refit the model's last layer on your corrected objects plus the reference "
                    "features shipped with it; writes an ordinary model folder for --model.")
    p.add_argument("kind", choices=list(FINETUNERS),
                   help="wbc: white-cell classes (crops export, or class folders of single-cell "
                        "images: the 11 classes or NEU/LY/MO/EO/BA/IG); mitosis: points CSV "
                        "exports beside their images (accepted/rejected/added); nuclei: "
                        "corrected masks (label TIFF, OME-Zarr, COCO or GeoJSON exports with "
                        "their images, each exported region taken as reviewed); smear: corrected "
                        "cells of smear fields (the same exports, each field taken as reviewed: "
                        "RBC / WBC / platelets; for white-cell subtypes use wbc)")
    p.add_argument("--data", action="append", required=True, metavar="DATA",
                   help="an exported folder or file (repeat for several)")
    p.add_argument("--out", required=True, metavar="MODEL", help="the model folder to write")
    p.add_argument("--from", dest="base", default="bundled", metavar="bundled|MODEL",
                   help="the model to start from (default: the bundled one)")
    p.add_argument("--max-minutes", type=positive_float, default=2.0,
                   help="time budget of the settings search (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace MODEL if it exists")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from napari_hemato.api import finetune
    from napari_hemato.finetune.common import Progress

    last = [None]

    def show(step: str, fraction: float) -> None:
        head = step.split(" (")[0].rstrip("0123456789/ ")
        if head != last[0]:
            sys.stderr.write(f"{fraction:4.0%} {step}\n")
            last[0] = head

    base = None if args.base == "bundled" else args.base
    result = finetune(args.kind, args.data, args.out, base=base, max_minutes=args.max_minutes,
                      overwrite=args.overwrite, threads=args.threads, progress=Progress(show))
    c = result.corrections
    what = (f"{c['cells']} cells in {c['regions']} corrected field(s)" if "cells" in c and "regions" in c
            else f"{c['cells']} corrected cells" if "cells" in c else f"{c['points']} corrected points" if "points" in c
            else f"{c['nuclei']} nuclei in {c['regions']} corrected region(s)")
    out(f"wrote {result.folder} in {result.minutes:.1f} min from {what}")
    for when in ("before", "after"):
        numbers = {k: v for k, v in result.metrics.get(when, {}).items() if isinstance(v, float)}
        out(f"  {when}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in numbers.items()))
    usage = {"wbc": f"napari-hemato analyze FIELD --task smear --classifier {result.folder}, or "
                    f"napari-hemato classify-cells IMAGES --model {result.folder}",
             "mitosis": f"napari-hemato analyze SLIDE --task mitosis --model {result.folder}",
             "nuclei": f"napari-hemato analyze SLIDE --task nuclei --model {result.folder}",
             "smear": f"napari-hemato analyze FIELD --task smear --model {result.folder}"}
    if result.metrics.get("after", {}).get("note"):
        out(f"  note: {result.metrics['after']['note']}")
    out(f"use it: {usage[args.kind]}")
    return 0
