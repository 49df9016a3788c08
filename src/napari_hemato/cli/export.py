"""``export`` subcommand: a run's result or autosaved corrections -> exchange formats."""

from __future__ import annotations

from pathlib import Path

from napari_hemato.cli._util import out
from napari_hemato.core.errors import HematoError


def register(sub) -> None:
    from napari_hemato.io.exporting import FORMATS

    p = sub.add_parser(
        "export", help="export results or corrections (crops+manifest, TIFF, OME-Zarr, COCO, GeoJSON, CSV)",
        description="SOURCE is a result store (RESULT.zarr from analyze) or an autosaved corrections "
                    "folder (IMAGE.hemato/<layer name>, written by the Review widget).")
    p.add_argument("source", type=Path)
    p.add_argument("--format", nargs="+", choices=sorted(FORMATS), required=True, dest="formats")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--name", help="base name of the outputs (default: the source's name)")
    p.add_argument("--only-reviewed", action="store_true", help="export reviewed objects only")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def load_source(source: Path):
    """An AnnotationSet from a result store or an autosaved corrections folder."""
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.sidecar import load_annotations

    if (source / "meta.json").exists():
        return load_annotations(source)
    from napari_hemato.core.engine import open_result

    result = open_result(source)
    if result.status != "complete":
        raise HematoError(f"{source}: the run is {result.status}; finish it with analyze --resume first")
    return from_result(result)


def cmd_export(args) -> int:
    from napari_hemato.io.exporting import export_annotations

    ann = load_source(args.source)
    name = args.name or args.source.name.split(".")[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = export_annotations(ann, args.out_dir, args.formats, name=name,
                                 overwrite=args.overwrite, only_reviewed=args.only_reviewed)
    for fmt, path in written.items():
        out(f"{fmt:<11} {path}")
    return 0
