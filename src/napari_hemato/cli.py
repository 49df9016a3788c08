"""``napari-hemato`` command line: info, analyze, demo, models.

Every subcommand has ``--help``. Errors print one line naming the file and the
problem and exit with status 2 (bad input) or 1 (other failures); Ctrl-C stops a
run with status 130, keeping finished tiles for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from napari_hemato import __version__
from napari_hemato.core.errors import HematoError

log = logging.getLogger("napari_hemato")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _roi(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(float(v)) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--roi wants y0,x0,y1,x1 in level-0 pixels, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-hemato",
        description="Whole-slide deep learning for blood smears and H&E (headless core of the napari plugin).",
    )
    parser.add_argument("--version", action="version", version=f"napari-hemato {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="levels, shapes and µm/px of a slide or image")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=_positive_float, help="override the pixel size (µm/px)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("analyze", help="run a task's model over a slide, tiled and resumable")
    p.add_argument("slide", type=Path)
    p.add_argument("--task", choices=("smear", "nuclei", "mitosis"), required=True)
    p.add_argument("--out", type=Path, help="result store (.zarr folder; default SLIDE.hemato.zarr here)")
    p.add_argument("--model", type=Path, help="model folder (model.onnx + model.json); default: bundled")
    p.add_argument("--mpp", type=_positive_float, help="pixel size of the slide in µm/px (overrides metadata)")
    p.add_argument("--roi", type=_roi, help="region y0,x0,y1,x1 in level-0 pixels (default: whole slide)")
    p.add_argument("--tile", type=int, help="tile core size in model pixels (default: the model's)")
    p.add_argument("--batch", type=int, default=4, help="tiles per inference call (default 4)")
    p.add_argument("--scheduler", help="dask.distributed scheduler address to run tiles on a cluster")
    p.add_argument("--resume", action="store_true", help="continue a cancelled run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result in --out")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers: cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    p.add_argument("--table", type=Path, help="also write the object table to this CSV")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="analyse the bundled H&E sample slide (the README's main job)")
    p.add_argument("--out", type=Path, help="where to keep the result (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(func=cmd_models)
    return parser


def cmd_info(args) -> int:
    from napari_hemato.core.slide import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide.info()
    if args.json:
        _out(json.dumps(info, indent=2))
        return 0
    mpp = f"{info['mpp']:.4g} µm/px ({info['mpp_source']})" if info["mpp"] else "unknown (pass --mpp)"
    _out(f"{info['path']}")
    _out(f"  format    {info['backend']}, {info['dtype']}, {info['channels']} channel(s)")
    _out(f"  pixel     {mpp}")
    for i, level in enumerate(info["levels"]):
        h, w = level["shape"][:2]
        lm = f"{level['mpp']:.4g} µm/px" if level["mpp"] else "-"
        _out(f"  level {i}   {h} × {w} px  downsample {level['downsample']:.4g}  {lm}")
    return 0


def _progress_bar(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="tile", file=sys.stderr,
                disable=None, dynamic_ncols=True)


def run_analysis(slide_path: Path, *, task: str, out: Path, model=None, mpp=None, roi=None,
                 tile=None, batch=4, scheduler=None, resume=False, overwrite=False,
                 providers="cpu", threads=None):
    """Run one analysis with a progress bar on stderr; returns the RunResult."""
    from napari_hemato.api import load_predictor
    from napari_hemato.core.engine import iter_run
    from napari_hemato.core.slide import open_slide

    slide = open_slide(slide_path, mpp=mpp)
    predictor = load_predictor(task, model, providers=providers, threads=threads)
    gen = iter_run(slide, predictor, out=out, roi=roi, tile=tile, batch_size=batch,
                   scheduler=scheduler, resume=resume, overwrite=overwrite)
    bar = None
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if bar is None:
                bar = _progress_bar(event.total, event.skipped, f"{task} {slide_path.name}")
            bar.update(event.done - bar.n)
            bar.set_postfix(objects=event.n_objects, refresh=False)
    except KeyboardInterrupt:
        gen.close()
        raise
    finally:
        if bar is not None:
            bar.close()


def summary(result, slide_path: Path) -> dict:
    from napari_hemato.core.table import summarize

    table = result.table()
    grid = result.grid
    megapixels = (grid.roi[2] - grid.roi[0]) * (grid.roi[3] - grid.roi[1]) / 1e6
    return {
        "slide": str(slide_path),
        "task": result.spec.task,
        "model": f"{result.spec.name} {result.spec.version}",
        "status": result.status,
        "result": str(result.path),
        "tiles": len(result.plan),
        "seconds": round(result.elapsed, 2),
        "megapixels": round(megapixels, 2),
        "megapixels_per_s": round(megapixels / result.elapsed, 3) if result.elapsed else None,
        "work_mpp": grid.mpp,
        "mpp_assumed": grid.mpp_assumed,
        **summarize(table),
    }


def _print_summary(s: dict) -> None:
    _out(f"napari-hemato {s['task']}: {s['slide']}")
    _out(f"  model     {s['model']}")
    assumed = " (ASSUMED: image has no pixel size; pass --mpp)" if s["mpp_assumed"] else ""
    _out(f"  analysed  {s['megapixels']} MP at {s['work_mpp']:.3g} µm/px{assumed}")
    _out(f"  time      {s['seconds']} s over {s['tiles']} tiles ({s['megapixels_per_s']} MP/s)")
    _out(f"  objects   {s['n_objects']}")
    for name, count in s["counts"].items():
        _out(f"    {name:<12} {count:>7}  {s['percent'][name]:5.1f} %")
    if s["mean_confidence"] is not None:
        _out(f"  mean confidence {s['mean_confidence']:.3f}")
    _out(f"  result    {s['result']}  (labels + objects.csv)")


def cmd_analyze(args) -> int:
    out = args.out or Path.cwd() / f"{args.slide.name}.hemato.zarr"
    try:
        result = run_analysis(args.slide, task=args.task, out=out, model=args.model, mpp=args.mpp,
                              roi=args.roi, tile=args.tile, batch=args.batch,
                              scheduler=args.scheduler, resume=args.resume,
                              overwrite=args.overwrite, providers=args.providers,
                              threads=args.threads)
    except KeyboardInterrupt:
        sys.stderr.write(f"\ncancelled; finished tiles are kept in {out}: rerun with --resume\n")
        return 130
    s = summary(result, args.slide)
    if args.table:
        shutil.copyfile(result.path / "objects.csv", args.table)
        s["table"] = str(args.table)
    if args.json:
        _out(json.dumps(s, indent=2))
    else:
        _print_summary(s)
    return 0


def cmd_demo(args) -> int:
    from napari_hemato.samples import sample_path

    slide = sample_path("he_slide")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="hemato-demo-"))
    out = out_dir / "cmu_small_region.hemato.zarr"
    _out(f"Demo: H&E nucleus segmentation on the bundled Aperio slide {slide.name} (CC0)")
    result = run_analysis(slide, task="nuclei", out=out, overwrite=True)
    _print_summary(summary(result, slide))
    table = result.table()
    if len(table):
        _out(f"  nucleus area: median {table['area_um2'].median():.1f} µm², "
             f"IQR {table['area_um2'].quantile(0.25):.1f}-{table['area_um2'].quantile(0.75):.1f} µm²")
    _out(f"Open it in napari: napari {slide}  (then the result store {out})")
    return 0


def cmd_models(args) -> int:
    from napari_hemato.models.registry import bundled_models
    from napari_hemato.models.spec import load_spec

    models = bundled_models()
    if not models:
        _out("no bundled models")
    for task, folder in models.items():
        spec = load_spec(folder)
        _out(f"{task:<8} {spec.name} {spec.version}  {spec.kind}, {spec.mpp} µm/px, "
             f"classes: {', '.join(spec.class_names)}  ({folder})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HematoError as err:
        sys.stderr.write(f"napari-hemato: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
