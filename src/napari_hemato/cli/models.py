"""``models``, ``classify-cells``, ``train`` and ``evaluate`` subcommands."""

from __future__ import annotations

import csv
import importlib
import logging
import os
import tempfile
from pathlib import Path

from napari_hemato.cli._util import out, progress_bar
from napari_hemato.core.errors import HematoError

TRAINABLE = ("smear", "wbc", "nuclei", "mitosis")


def register(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models (export one with models export-bioimageio)")
    p.set_defaults(func=cmd_models)
    msub = p.add_subparsers(dest="models_command", metavar="COMMAND")
    e = msub.add_parser(
        "export-bioimageio", help="write a model as a bioimage.io package (rdf.yaml 0.5 + ONNX zip)",
        description="MODEL_DIR_OR_TASK is a model folder (model.onnx + model.json, e.g. a "
                    "fine-tuned one) or a task with a bundled model. The package holds the ONNX "
                    "weights, a test input/output pair, a cover, the model card and the spec under "
                    "config.napari_hemato; check it with `bioimageio test PKG.zip` (bioimageio.core).")
    e.add_argument("model", metavar="MODEL_DIR_OR_TASK")
    e.add_argument("--out", type=Path, required=True, metavar="PKG.zip")
    e.add_argument("--license", default=None,
                   help="SPDX licence id of the package (default: the project's, BSD-3-Clause)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_bioimageio)

    p = sub.add_parser("classify-cells", help="classify single-cell images into the 11 WBC classes")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                   help="single-cell images (one WBC near the centre, any size) or folders of them")
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--model", type=Path, help="classifier folder (default: bundled wbc model)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of the images, when known (a red-cell-scale model then cuts its "
                        "physical window without reading the red cells around each cell)")
    p.add_argument("--ruler", choices=("pooled", "per-cell"), default="pooled",
                   help="without --mpp, how a red-cell-scale model finds the pixel size: 'pooled' "
                        "(default) reads the red cells of a sample of each image size and uses "
                        "their median for all images of that size when they agree (one device, one "
                        "pixel size; else each image is read); 'per-cell' reads every image")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_classify)

    for name, helptext in (("train", "train a model (needs the [train] extra: torch)"),
                           ("evaluate", "evaluate a model on held-out data, print JSON")):
        p = sub.add_parser(name, help=helptext, add_help=False,
                           description=f"{helptext}; options after TASK go to the task's trainer "
                                       f"(napari-hemato {name} TASK --help)")
        p.add_argument("task", choices=TRAINABLE, nargs="?")
        p.set_defaults(func=cmd_train if name == "train" else cmd_evaluate, passthrough=True,
                       parser=p)


def cmd_models(args) -> int:
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.registry import bundled_models

    models = bundled_models()
    if not models:
        out("no bundled models")
    for task, folder in models.items():
        spec = load_spec(folder)
        pre = spec.preprocess or {}
        mpp = (f"{spec.mpp} µm/px" if spec.mpp
               else f"{pre['window_um']:g} µm windows" if pre.get("scale") == "red-cell"
               else "size-normalised crops")
        nets = f"; float + int8 networks (the CPU runs {spec.int8['onnx']})" if spec.int8 else ""
        # a model that ships its replay can be fine-tuned on a user's corrections without torch
        tune = f"; fine-tune: napari-hemato finetune {task}" if (folder / "replay.npz").is_file() else ""
        out(f"{task:<8} {spec.name} {spec.version}  {spec.kind}, {mpp}; "
            f"classes: {', '.join(spec.class_names)}{nets}{tune}")
        out(f"         {folder}")
    return 0


def cmd_export_bioimageio(args) -> int:
    from napari_hemato.models.bioimageio import LICENSE, export_bioimageio

    path = export_bioimageio(args.model, args.out, overwrite=args.overwrite,
                             license=args.license or LICENSE)
    out(f"bioimage.io package {path}")
    return 0


def _dispatch(module: str, args) -> int:
    if args.task is None:
        args.parser.print_help()
        if any(a in ("-h", "--help") for a in args.rest):
            return 0
        raise HematoError(f"choose a task: {', '.join(TRAINABLE)}")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise HematoError(f"{module} needs the training extra: pip install 'napari-hemato[train]' ({err})") from None
    # trainers and evaluators report per-epoch progress through logging; the CLI's root
    # logger is at WARNING unless --verbose, so let the package's INFO records through
    logging.getLogger("napari_hemato.train").setLevel(logging.INFO)
    return int(mod.main(list(args.rest)) or 0)


def cmd_train(args) -> int:
    return _dispatch(f"napari_hemato.train.{args.task}", args)


def cmd_evaluate(args) -> int:
    return _dispatch(f"napari_hemato.train.evaluate_{args.task}", args)


def _cell_images(paths: list[Path]) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        else:
            found.append(path)
    return found


#: single-cell images read straight with Pillow (a slide reader's lazy levels cost ~4 ms each)
_PLAIN = {".jpg", ".jpeg", ".png", ".bmp"}


def _read_cell(path: Path):
    """One single-cell image as (H, W, 3) uint8; a HematoError when it cannot be read."""
    import numpy as np

    from napari_hemato.core.slide import open_slide, to_rgb8

    if path.suffix.lower() in _PLAIN:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:  # unreadable, truncated, not an image
            raise HematoError(f"{path}: cannot read the image ({err})") from None
    with open_slide(path) as slide:
        return to_rgb8(np.asarray(slide.levels[0]))


def _image_size(path: Path):
    """(width, height) from the file header (Pillow reads no pixels), or None."""
    if path.suffix.lower() not in _PLAIN:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return None


def _pooled_pixel_sizes(classifier, images: list[Path]) -> dict[Path, float]:
    """µm/px per image where a pooled red-cell reading stands for its image-size group.

    Images of one size from one folder come from one device: a sample of
    ``POOL_SAMPLE`` per size (evenly spread through the sorted list) is read by
    the ruler; if the readings agree, their median is every image's pixel size.
    Groups smaller than twice the sample, unreadable samples or disagreeing
    readings keep the per-image ruler.
    """
    from napari_hemato.models.window_scale import POOL_SAMPLE, pool_sample

    if classifier.scale.mode != "red-cell":
        return {}
    groups: dict = {}
    for path in images:
        size = _image_size(path)
        if size is not None:
            groups.setdefault(size, []).append(path)
    found: dict[Path, float] = {}
    for (w, h), paths in groups.items():
        if len(paths) < 2 * POOL_SAMPLE:
            continue
        crops = []
        for i in pool_sample(len(paths)):
            try:
                crops.append(_read_cell(paths[i]))
            except HematoError:
                continue
        reading = classifier.pooled_mpp(crops)
        if reading.ok:
            found.update(dict.fromkeys(paths, reading.mpp))
            out(f"pixel size {reading.mpp:.4f} µm/px for the {len(paths)} images of {w}x{h} px: "
                f"median red-cell ruler of {reading.n_ok} of {reading.n_read} sampled (spread "
                f"{reading.spread:.2f}); --ruler per-cell reads each image")
        else:
            out(f"the {len(paths)} images of {w}x{h} px: the red cells of {reading.n_read} sampled "
                f"images disagree or are too few ({reading.n_ok} read, spread {reading.spread:.2f}); "
                "each image is read")
    return found


def cmd_classify(args) -> int:
    import numpy as np

    from napari_hemato.models.cell_classifier import CellClassifier

    if args.out.exists() and not args.overwrite:
        raise HematoError(f"{args.out}: already exists (pass --overwrite)")
    if args.mpp is not None and not (0 < args.mpp < 100):
        raise HematoError(f"--mpp {args.mpp}: a pixel size is a positive number of µm per pixel")
    images = _cell_images(args.images)
    if not images:
        raise HematoError("no cell images given")
    classifier = CellClassifier(args.model)
    names = list(classifier.spec.class_names)
    pooled = _pooled_pixel_sizes(classifier, images) if args.mpp is None and args.ruler == "pooled" else {}
    rows, errors = [], 0
    bar = progress_bar(len(images), 0, "classify", unit="cell")
    for start in range(0, len(images), 64):
        chunk, crops = [], []
        for path in images[start : start + 64]:
            try:
                crops.append(_read_cell(path))
                chunk.append(path)
            except HematoError as err:
                errors += 1
                bar.write(f"napari-hemato: skipped {err}")
        if crops:
            mpp = args.mpp if args.mpp is not None or not pooled else [pooled.get(p) for p in chunk]
            probs, _ = classifier.classify_crops(crops, mpp=mpp, cams=False)
            for path, p in zip(chunk, probs, strict=True):
                k = int(np.argmax(p))
                rows.append([str(path), names[k], f"{p[k]:.4f}", *(f"{v:.4f}" for v in p)])
        bar.update(len(images[start : start + 64]))
    bar.close()
    fd, tmp = tempfile.mkstemp(dir=args.out.parent if str(args.out.parent) else ".", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "confidence", *(f"prob_{n}" for n in names)])
        writer.writerows(rows)
    os.replace(tmp, args.out)
    counts = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    out(f"classified {len(rows)} cell image(s) into {args.out}" + (f"; {errors} unreadable" if errors else ""))
    for name in names:
        if counts.get(name):
            out(f"  {name:<5} {counts[name]:>6}  {100 * counts[name] / len(rows):5.1f} %")
    return 2 if errors else 0
