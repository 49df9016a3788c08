"""Export and import corrected annotations, Qt-free, each format with an exact round-trip.

Every exporter takes an :class:`~napari_hemato.core.annotations.AnnotationSet`
and a destination, writes under a temporary name beside it and renames it into
place (nothing partial is ever left), refuses to replace existing output unless
``overwrite=True`` and, given ``base_dir=``, refuses destinations outside it.
Every importer returns an ``AnnotationSet``; failures raise :class:`ExportError`.

========================  ==========================  ===========================
format                    export                      import
========================  ==========================  ===========================
cell crops + manifest     :func:`export_crops`        :func:`import_crops`
uint32 TIFF + CSV         :func:`export_tiff`         :func:`import_tiff`
OME-Zarr (NGFF 0.5)       :func:`export_omezarr`      :func:`import_omezarr`
COCO JSON, RLE masks      :func:`export_coco`         :func:`import_coco`
QuPath GeoJSON            :func:`export_geojson`      :func:`import_geojson`
points CSV (mitoses)      :func:`export_points_csv`   :func:`import_points_csv`
========================  ==========================  ===========================

:func:`export_annotations` writes one set in several formats into a folder
(:data:`FORMATS` names them and their file suffixes).

Examples
--------
>>> from napari_hemato.core.export import export_geojson, import_geojson
>>> export_geojson(cells, "cells.geojson")  # doctest: +SKIP
>>> import_geojson("cells.geojson").table.equals(cells.table)  # doctest: +SKIP
True
"""

from __future__ import annotations

from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export.coco import (
    decode_rle,
    encode_rle,
    export_coco,
    import_coco,
    rle_from_string,
    rle_to_string,
)
from napari_hemato.core.export.crops import crop_box, export_crops, import_crops, slide_split
from napari_hemato.core.export.formats import FORMATS, export_annotations, formats_for
from napari_hemato.core.export.geojson import (
    export_geojson,
    import_geojson,
    rasterize,
    trace_polygons,
)
from napari_hemato.core.export.omezarr import export_omezarr, import_omezarr
from napari_hemato.core.export.points_csv import export_points_csv, import_points_csv
from napari_hemato.core.export.tiff import export_tiff, import_tiff

__all__ = [
    "FORMATS",
    "ExportError",
    "atomic_outputs",
    "check_destination",
    "crop_box",
    "decode_rle",
    "encode_rle",
    "export_coco",
    "export_annotations",
    "export_crops",
    "export_geojson",
    "export_omezarr",
    "export_points_csv",
    "export_tiff",
    "formats_for",
    "import_coco",
    "import_crops",
    "import_geojson",
    "import_omezarr",
    "import_points_csv",
    "import_tiff",
    "rasterize",
    "rle_from_string",
    "rle_to_string",
    "slide_split",
    "trace_polygons",
]
