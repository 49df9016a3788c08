"""The export formats and one entry point for all of them (widget, CLI, npe2 writers)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from napari_hemato.core.annotations import AnnotationSet


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str  # appended to the base name ("" = a folder)
    kinds: tuple[str, ...]
    description: str


FORMATS = {
    "crops": Format("crops", "_crops", ("instances", "points"),
                    "cell crops + manifest.csv (napari-hemato train reads it)"),
    "tiff": Format("tiff", "_labels.tif", ("instances",), "uint32 label TIFF + CSV table"),
    "omezarr": Format("omezarr", ".ome.zarr", ("instances", "points"), "OME-Zarr image region + labels + class table"),
    "coco": Format("coco", "_coco.json", ("instances",), "COCO JSON (RLE masks) + the image region as PNG"),
    "geojson": Format("geojson", ".geojson", ("instances", "points"), "QuPath GeoJSON"),
    "points_csv": Format("points_csv", "_points.csv", ("points",), "points CSV (px and µm)"),
}


def formats_for(kind: str) -> list[str]:
    return [f.name for f in FORMATS.values() if kind in f.kinds]


def safe_name(name: str) -> str:
    """A file name base without spaces or path separators.

    Examples
    --------
    >>> safe_name("field 1 smear (region 2)")
    'field_1_smear_region_2'
    """
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "export"


def destinations(folder: str | Path, formats, *, name: str) -> dict[str, Path]:
    """``{format: path}`` :func:`export_annotations` writes (to check before writing)."""
    return {fmt: Path(folder) / f"{safe_name(name)}{FORMATS[fmt].suffix}" for fmt in formats}


def export_annotations(ann: AnnotationSet, folder: str | Path, formats, *, name: str,
                       overwrite: bool = False, only_reviewed: bool = False) -> dict[str, Path]:
    """Write ``ann`` in each of ``formats`` into ``folder`` as ``<name><suffix>`` (``name``
    without spaces: :func:`safe_name`).

    Destinations outside ``folder`` are refused; each file appears whole or not at all.

    Examples
    --------
    >>> export_annotations(cells, "exports", ["geojson", "coco"], name="field1")  # doctest: +SKIP
    {'geojson': PosixPath('exports/field1.geojson'), 'coco': PosixPath('exports/field1_coco.json')}
    """
    from napari_hemato.core import export as ex  # the package imports this module

    folder = Path(folder)
    if only_reviewed:
        import numpy as np

        table = ann.table[ann.table["reviewed"].astype(bool)].reset_index(drop=True)
        labels = ann.labels
        if labels is not None:
            labels = np.where(np.isin(labels, table["id"].to_numpy()), labels, 0).astype(np.uint32)
        ann = AnnotationSet(ann.kind, table, ann.class_names, labels, ann.origin, ann.mpp,
                            ann.image_path, ann.image_shape, ann.metadata)
    functions = {"crops": ex.export_crops, "tiff": ex.export_tiff, "omezarr": ex.export_omezarr,
                 "coco": ex.export_coco, "geojson": ex.export_geojson,
                 "points_csv": ex.export_points_csv}
    written = {}
    for fmt in formats:
        spec = FORMATS[fmt]
        if ann.kind not in spec.kinds:
            raise ex.ExportError(f"{fmt} export does not apply to {ann.kind}")
        dest = folder / f"{safe_name(name)}{spec.suffix}"
        written[fmt] = functions[fmt](ann, dest, overwrite=overwrite, base_dir=folder)
    return written
