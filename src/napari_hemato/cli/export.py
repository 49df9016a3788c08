"""``export`` subcommand: a run's result or autosaved corrections -> exchange formats."""

from __future__ import annotations

from pathlib import Path

from napari_hemato.cli._util import out
from napari_hemato.core.errors import HematoError


def register(sub) -> None:
    from napari_hemato.core.export.formats import FORMATS

    p = sub.add_parser(
        "export", help="export results or corrections (crops+manifest, TIFF, OME-Zarr, COCO, GeoJSON, CSV)",
        description="SOURCE is a result store (RESULT.zarr from analyze) or an autosaved corrections "
                    "folder (IMAGE.hemato/<layer name>, written by the Review widget).")
    p.add_argument("source", type=Path)
    p.add_argument("--format", nargs="+", choices=sorted(FORMATS), required=True, dest="formats")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--name", help="base name of the outputs (default: the source's name; "
                                  "STEM.TASK for analyze's IMAGE.TASK.hemato.zarr)")
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


def default_name(source: Path, task: str | None) -> str:
    """Base name of a source's exports: analyze's ``IMAGE.TASK.hemato.zarr`` gives
    ``STEM.TASK`` (one image's tasks export side by side), anything else its first part.

    Examples
    --------
    >>> default_name(Path("slide.svs.nuclei.hemato.zarr"), "nuclei"), default_name(Path("r.zarr"), "nuclei")
    ('slide.nuclei', 'r')
    """
    base = source.name.removesuffix(".hemato.zarr")
    if task and base != source.name and base.endswith(f".{task}"):
        return f"{Path(base.removesuffix(f'.{task}')).stem}.{task}"
    return source.name.split(".")[0]


def cmd_export(args) -> int:
    from napari_hemato.core.export.formats import export_annotations

    ann = load_source(args.source)
    name = args.name or default_name(args.source, (ann.metadata.get("model") or {}).get("task"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = export_annotations(ann, args.out_dir, args.formats, name=name,
                                 overwrite=args.overwrite, only_reviewed=args.only_reviewed)
    for fmt, path in written.items():
        out(f"{fmt:<11} {path}")
    return 0
