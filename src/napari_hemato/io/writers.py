"""npe2 writers: save a napari-hemato Labels or Points layer in an exchange format.

``File > Save Selected Layer(s)`` offers them by extension: ``.geojson``
(QuPath), ``.json`` (COCO, labels only; the image region as a PNG beside it),
``.zarr`` (OME-Zarr: the image region with the labels + table under it),
``.csv`` (points with px and µm coordinates). The image region is read from the
layer's source image; when it cannot be read, the labels are written alone.
"""

from __future__ import annotations

from pathlib import Path

from napari_hemato.io.layers import annotations_from_data


def _write(path: str, data, attributes: dict, fmt: str) -> list[str]:
    from napari_hemato.core import export as ex

    ann = annotations_from_data(data, attributes.get("metadata", {}), attributes.get("features"),
                                name=attributes.get("name", "layer"))
    functions = {"geojson": ex.export_geojson, "coco": ex.export_coco,
                 "omezarr": ex.export_omezarr, "points_csv": ex.export_points_csv}
    return [str(functions[fmt](ann, Path(path), overwrite=True))]


def write_geojson(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, "geojson")


def write_coco(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, "coco")


def write_omezarr(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, "omezarr")


def write_points_csv(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, "points_csv")
