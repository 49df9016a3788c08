"""``info``, ``analyze`` and ``demo`` subcommands."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from napari_hemato.cli._util import out, positive_float, progress_bar, roi_arg
from napari_hemato.core.errors import HematoError
from napari_hemato.tasks import get_task, task_names

IMAGE_SUFFIXES = {".svs", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".ndpi", ".mrxs",
                  ".scn", ".btf"}


def register(sub) -> None:
    p = sub.add_parser("info", help="levels, shapes and µm/px of a slide or image")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=positive_float, help="override the pixel size (µm/px)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "analyze", help="run a task's model over images or slides, tiled and resumable",
        description="Analyse one image/slide (results in --out, --table, --labels) or several "
                    "images / a folder (one table and label image per input in --out-dir). "
                    "Default names carry the task, so the tasks of one image never collide: "
                    "IMAGE.TASK.hemato.zarr (result store), STEM.TASK.csv (table), "
                    "STEM.TASK_labels.tif (labels), in --out-dir if given, else here.")
    p.add_argument("inputs", type=Path, nargs="+", metavar="IMAGE", help="image(s), slide(s) or a folder")
    p.add_argument("--task", choices=task_names(), required=True,
                   help="; ".join(f"{n}: {get_task(n).title}" for n in task_names()))
    p.add_argument("--out", type=Path,
                   help="result store (.zarr; one input; default IMAGE.TASK.hemato.zarr in "
                        "--out-dir, else here)")
    p.add_argument("--out-dir", type=Path,
                   help="folder for the results: store, table (STEM.TASK.csv) and, with --labels, "
                        "STEM.TASK_labels.tif per input; needed for several inputs or a folder")
    p.add_argument("--table", type=Path,
                   help="write the object table to this CSV (one input; default: none, or "
                        "STEM.TASK.csv with --out-dir)")
    p.add_argument("--labels", nargs="?", const="", metavar="TIF",
                   help="write instance labels as uint32 TIFF on the input's pixel grid "
                        "(a path for one input; just --labels: STEM.TASK_labels.tif in "
                        "--out-dir, else here)")
    p.add_argument("--model", type=Path, help="model folder (model.onnx + model.json); default: bundled")
    p.add_argument("--classifier", type=Path, help="smear: WBC classifier folder (default: bundled)")
    p.add_argument("--no-classifier", action="store_true", help="smear: skip WBC subtypes")
    p.add_argument("--mpp", type=positive_float, help="pixel size in µm/px (overrides metadata)")
    p.add_argument("--ruler", choices=("pooled", "per-image"), default="pooled",
                   help="smear fields that state no pixel size, several inputs: measure it once "
                        "per image size on 8 sampled fields when they agree (pooled, default) or on "
                        "every field (per-image)")
    p.add_argument("--no-estimate-mpp", action="store_true",
                   help="smear fields without a pixel size: assume the training images' (0.08 µm/px) "
                   "instead of measuring it on the red cells")
    p.add_argument("--roi", type=roi_arg, help="region y0,x0,y1,x1 in level-0 pixels (default: all)")
    p.add_argument("--tissue", metavar="auto|none|MASK_FILE",
                   help="read only the tiles touching tissue: auto (detect it), none (read every "
                        "tile) or a mask of the whole slide (PNG/TIFF binary image at any "
                        "resolution, or GeoJSON polygons in level-0 px); default: the task's ("
                        + ", ".join(f"{n}: {get_task(n).tissue_default}" for n in task_names())
                        + ")")
    p.add_argument("--tile", type=int, help="tile core size in model pixels (default: the model's)")
    p.add_argument("--batch", type=int, help="tiles per inference call (default: ~2.5 MP of input)")
    p.add_argument("--scheduler", help="dask.distributed scheduler address to run tiles on a cluster")
    p.add_argument("--resume", action="store_true", help="continue a cancelled run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace existing results")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers: cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    p.add_argument("--precision", choices=("auto", "float", "int8"),
                   help="network to run when the model has an int8 version: auto (default: "
                        "int8 on the CPU, float on a GPU), float or int8")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="analyse the bundled H&E sample slide (the README's main job)")
    p.add_argument("--out", type=Path, help="where to keep the result (default: a temporary folder)")
    p.add_argument("--view", action="store_true",
                   help="then open the slide and its result in napari (needs the viewer extra: "
                        "pip install 'napari-hemato[viewer]')")
    p.set_defaults(func=cmd_demo)


def cmd_info(args) -> int:
    from napari_hemato.core.slide import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide.info()
    if args.json:
        out(json.dumps(info, indent=2))
        return 0
    mpp = f"{info['mpp']:.4g} µm/px ({info['mpp_source']})" if info["mpp"] else "unknown (pass --mpp)"
    out(f"{info['path']}")
    out(f"  format    {info['backend']}, {info['dtype']}, {info['channels']} channel(s)")
    out(f"  pixel     {mpp}")
    for i, level in enumerate(info["levels"]):
        h, w = level["shape"][:2]
        lm = f"{level['mpp']:.4g} µm/px" if level["mpp"] else "-"
        out(f"  level {i}   {h} × {w} px  downsample {level['downsample']:.4g}  {lm}")
    return 0


def run_analysis(slide_path: Path, *, task: str, out_store: Path, model=None, classifier=None,
                 mpp=None, estimate_mpp=True, roi=None, tile=None, batch=None, scheduler=None,
                 resume=False, overwrite=False, providers="cpu", threads=None, tissue=None,
                 precision=None, pooled_mpp=None):
    """One analysis with a progress bar on stderr; returns the RunResult."""
    from napari_hemato.api import iter_analyze

    gen = iter_analyze(slide_path, task=task, model=model, classifier=classifier, mpp=mpp,
                       estimate_mpp=estimate_mpp, providers=providers, threads=threads,
                       out=out_store, roi=roi, tile=tile, batch_size=batch, scheduler=scheduler,
                       resume=resume, overwrite=overwrite, tissue=tissue, precision=precision,
                       pooled_mpp=pooled_mpp)
    bar = None
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if bar is None:
                bar = progress_bar(event.total, event.skipped, f"{task} {slide_path.name}")
            bar.update(event.done - bar.n)
            bar.set_postfix(objects=event.n_objects, refresh=False)
    except KeyboardInterrupt:
        gen.close()
        raise
    finally:
        if bar is not None:
            bar.close()


def summary(result, slide_path: Path) -> dict:
    from napari_hemato.api import analysed_area_mm2, pixel_size_origin
    from napari_hemato.core.summary import class_summary
    from napari_hemato.tasks import task_of

    table = result.table()
    grid = result.grid
    megapixels = (grid.roi[2] - grid.roi[0]) * (grid.roi[3] - grid.roi[1]) / 1e6
    area_mm2 = None if grid.mpp_assumed else megapixels * 1e6 * grid.mpp0**2 / 1e6
    s = {
        "image": str(slide_path), "task": result.spec.task,
        "model": f"{result.spec.name} {result.spec.version}", "status": result.status,
        "result": str(result.path), "tiles": len(result.plan), "seconds": round(result.elapsed, 2),
        "megapixels": round(megapixels, 2),
        "area_mm2": None if area_mm2 is None else round(area_mm2, 4),
        "megapixels_per_s": round(megapixels / result.elapsed, 3) if result.elapsed else None,
        "work_mpp": grid.mpp, "input_mpp": grid.mpp0, "mpp_assumed": grid.mpp_assumed,
        "input_mpp_origin": pixel_size_origin(result),
        "tissue": None if result.tissue is None else result.tissue.source,
        "tiles_off_tissue": result.n_off_tissue,
        "tissue_area_mm2": None,
        "objects_per_mm2": None,
        **class_summary(table),
        "warnings": list(result.warnings),
    }
    rate_area = analysed_area_mm2(result)
    if result.tissue is not None and rate_area is not None:
        s["tissue_area_mm2"] = round(rate_area, 4)
    if rate_area:
        s["objects_per_mm2"] = round(s["n_objects"] / rate_area, 1)
    s.update(task_of(result.spec.task).summary(table, area_mm2=rate_area,
                                              mpp=None if grid.mpp_assumed else grid.mpp0,
                                              region=tuple(grid.roi)))
    return s


def print_summary(s: dict) -> None:
    from napari_hemato.tasks import task_of

    out(f"napari-hemato {s['task']}: {s['image']}")
    out(f"  model     {s['model']}")
    said = {
        "assumed": "ASSUMED {:.3g} µm/px, as the model's training images",
        "confirmed": "{:.3g} µm/px, the training images', which its red cells confirm",
        "measured": "{:.3g} µm/px MEASURED on its red cells",
    }.get(s.get("input_mpp_origin"))
    origin = f" (the image states no pixel size: {said.format(s['input_mpp'])}; pass --mpp)" if said else ""
    area = f" ({s['area_mm2']} mm²)" if s.get("area_mm2") is not None else ""
    out(f"  analysed  {s['megapixels']} MP{area} at {s['work_mpp']:.3g} µm/px{origin}")
    if s.get("tissue"):
        area = s.get("tissue_area_mm2")
        out(f"  tissue    {'?' if area is None else area} mm² ({s['tissue']}); "
            f"{s['tiles_off_tissue']} of {s['tiles']} tiles off it, not read")
    out(f"  time      {s['seconds']} s over {s['tiles']} tiles ({s['megapixels_per_s']} MP/s)")
    per = f" ({s['objects_per_mm2']} / mm²{' of tissue' if s.get('tissue') else ''})" \
        if s.get("objects_per_mm2") is not None else ""
    out(f"  objects   {s['n_objects']}{per}")
    for name, count in s["counts"].items():
        out(f"    {name:<12} {count:>7}  {s['percent'][name]:5.1f} %")
    for line in task_of(s["task"]).summary_lines(s):
        out(f"  {line}")
    if s["mean_confidence"] is not None:
        out(f"  mean confidence {s['mean_confidence']:.3f}")
    for warning in s.get("warnings", ()):
        out(f"  WARNING   {warning}")
    out(f"  result    {s['result']}")


def _expand(inputs: list[Path]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zattrs").exists():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def default_outputs(path: Path, task: str, out_dir: Path | None = None, *,
                    want_labels: bool = False) -> tuple[Path, Path, Path | None]:
    """Default (store, table, labels) paths of one input: in ``out_dir``, else the cwd.

    Every name carries the task, so analysing one image for several tasks never
    makes one run collide with (or, with ``--overwrite``, destroy) another's.

    Examples
    --------
    >>> [p.name for p in default_outputs(Path("s/slide.svs"), "nuclei", Path("r"), want_labels=True)]
    ['slide.svs.nuclei.hemato.zarr', 'slide.nuclei.csv', 'slide.nuclei_labels.tif']
    """
    folder = out_dir if out_dir is not None else Path.cwd()
    return (folder / f"{path.name}.{task}.hemato.zarr", folder / f"{path.stem}.{task}.csv",
            folder / f"{path.stem}.{task}_labels.tif" if want_labels else None)


def cmd_analyze(args) -> int:
    inputs = _expand(args.inputs)
    batch = len(inputs) > 1 or args.inputs[0].is_dir()
    if not inputs:
        raise HematoError(f"no images found in {', '.join(map(str, args.inputs))}")
    if batch and not args.out_dir:
        raise HematoError("several inputs: pass --out-dir for the per-input results")
    if batch and (args.out or args.table or args.labels):
        raise HematoError("several inputs: results go to --out-dir (use --labels without a path)")
    options = dict(task=args.task, model=args.model,
                   classifier=False if args.no_classifier else args.classifier, mpp=args.mpp,
                   estimate_mpp=not args.no_estimate_mpp, roi=args.roi, tile=args.tile,
                   batch=args.batch, scheduler=args.scheduler,
                   resume=args.resume, overwrite=args.overwrite, providers=args.providers,
                   threads=args.threads, tissue=args.tissue, precision=args.precision)
    if batch:
        stems = {}
        for path in inputs:
            stems.setdefault(path.stem, []).append(str(path))
        same = [names for names in stems.values() if len(names) > 1]
        if same:
            raise HematoError(f"inputs {', '.join(same[0])} would write the same results in "
                              f"{args.out_dir}; analyse them into different --out-dir folders")
    if batch and args.mpp is None and not args.no_estimate_mpp and args.ruler == "pooled":
        from napari_hemato.api import load_predictor

        predictor = load_predictor(args.task, args.model, providers=args.providers,
                                   threads=args.threads, precision=args.precision)
        options["pooled_mpp"] = get_task(args.task).pool_pixel_sizes(inputs, predictor)
    summaries, failed = [], 0
    for path in inputs:
        store, table, labels = default_outputs(path, args.task, args.out_dir,
                                               want_labels=args.labels is not None)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        else:
            table = None  # one input without --out-dir: a table only where --table says
        store = args.out or store
        table = args.table or table
        labels = Path(args.labels) if args.labels else labels
        try:
            result = run_analysis(path, out_store=store, **options)
        except KeyboardInterrupt:
            sys.stderr.write(f"\ncancelled; finished tiles are kept in {store}: rerun with --resume\n")
            return 130
        except HematoError as err:
            if not batch:
                raise
            sys.stderr.write(f"napari-hemato: error: {err}\n")
            failed += 1
            continue
        s = summary(result, path)
        if table:
            from napari_hemato.core.export._atomic import atomic_outputs

            # a temporary name beside the table, renamed in: a full disk names the table
            with atomic_outputs([table], overwrite=True) as (tmp,):
                shutil.copyfile(result.path / "objects.csv", tmp)
            s["table"] = str(table)
        if labels and result.labels() is not None:
            from napari_hemato.core.export.tiff import export_result_tiff

            # folder mode rewrites its own default TIFF (e.g. after --resume); a given path needs --overwrite
            rewrite = args.overwrite or (args.out_dir is not None and not args.labels)
            s["labels"] = str(export_result_tiff(result, labels, overwrite=rewrite))
        summaries.append(s)
        if not args.json:
            print_summary(s)
    if args.json:
        out(json.dumps(summaries[0] if not batch else summaries, indent=2))
    return 2 if failed else 0


VIEWER_HINT = "pip install 'napari-hemato[viewer]'"
QT_BINDINGS = ("PyQt6", "PySide6", "PyQt5", "PySide2")


def qt_binding() -> str | None:
    """The Qt binding napari would use, if one is installed (found, not imported)."""
    import importlib.util

    return next((b for b in QT_BINDINGS if importlib.util.find_spec(b) is not None), None)


def cmd_demo(args) -> int:
    from napari_hemato.samples import sample_path

    if args.view and qt_binding() is None:  # say so before spending a minute on the analysis
        sys.stderr.write(f"napari-hemato demo --view: napari needs a Qt binding (PyQt6, PySide6, "
                         f"...), and none is installed. Install the viewer extra:  {VIEWER_HINT}\n")
        return 3
    slide = sample_path("he_slide")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="hemato-demo-"))
    store = out_dir / "cmu_small_region.hemato.zarr"
    out(f"Demo: H&E nucleus segmentation on the bundled Aperio slide {slide.name} (CC0)")
    result = run_analysis(slide, task="nuclei", out_store=store, overwrite=True)
    print_summary(summary(result, slide))
    table = result.table()
    if len(table):
        q = table["area_um2"].quantile([0.25, 0.5, 0.75])
        out(f"  nucleus area  median {q[0.5]:.1f} µm², IQR {q[0.25]:.1f}–{q[0.75]:.1f} µm²")
    if args.view:
        out("Opening napari (close its window to finish)…")
        view_result(slide, result)
    else:
        out(f"See it in napari:  napari-hemato demo --view   (needs the viewer extra: {VIEWER_HINT})")
    return 0


def view_result(slide, result, *, run: bool = True):
    """Open ``slide`` and ``result``'s layers in a napari viewer (blocks until it closes,
    unless ``run`` is False: then the viewer is returned, for tests)."""
    import napari

    from napari_hemato.io import point_lod
    from napari_hemato.io.reader import read_slide
    from napari_hemato.io.viewer import result_layer_data

    viewer = napari.Viewer(title=f"napari-hemato: {Path(slide).name}")
    point_lod.install(viewer)  # a million points are drawn with a level of detail
    for data, kwargs, kind in read_slide(str(slide))[:1]:
        viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
    name = f"{Path(slide).stem} {result.spec.task}"
    for data, kwargs, kind in result_layer_data(result, name=name):
        layer = napari.layers.Layer.create(data, kwargs, kind)
        point_lod.prepare(viewer, layer)
        viewer.add_layer(layer)
    viewer.window.add_plugin_dock_widget("napari-hemato", "Review and correct")
    if run:
        napari.run()
    return viewer
