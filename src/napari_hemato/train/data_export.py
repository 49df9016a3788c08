"""Instance masks the plugin exported (corrected in review) as training regions.

The Export widget and ``napari-hemato export`` write corrected instances as a
uint32 label TIFF + CSV (``<name>_labels.tif``), OME-Zarr (``<name>.ome.zarr``),
COCO JSON (``<name>_coco.json``) or QuPath GeoJSON (``<name>.geojson``). Each
records the image it was drawn on, the level-0 origin of its label image and
the pixel size. :func:`list_instance_exports` finds them in a folder and
:func:`load_instance_export` reads one back as an image region with its labels
and a class per label, which the smear and nuclei trainers turn into training
images (``napari-hemato train smear|nuclei --data EXPORT_DIR``).

The image is looked up at its recorded path, then beside the export under the
same file name, then in ``images`` (a folder), so an export folder can move to
another machine together with its images.

No torch here.

Examples
--------
>>> regions = [load_instance_export(p) for p in list_instance_exports("exports")]  # doctest: +SKIP
>>> regions[0].labels.shape == regions[0].image.shape[:2]  # doctest: +SKIP
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: export file names by format (the suffixes of :data:`napari_hemato.io.exporting.FORMATS`)
SUFFIXES = {"tiff": "_labels.tif", "omezarr": ".ome.zarr", "coco": "_coco.json", "geojson": ".geojson"}


@dataclass
class ExportedRegion:
    """One exported region: level-0 pixels, labels and classes."""

    key: str  # "export/<export file name>"
    image: np.ndarray  # (H, W, 3) uint8, level 0 of the image over the labels' box
    labels: np.ndarray  # (H, W) int64, 0 = background
    classes: dict[int, str]  # label id -> class name
    mpp: float | None  # level-0 µm/px (None when the export did not know it)
    reviewed: dict[int, bool]  # label id -> confirmed by a person
    table: pd.DataFrame  # the exported object table (``cell_type``, probabilities, ...)


def _format_of(path: Path) -> str | None:
    name = path.name
    for fmt, suffix in SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def list_instance_exports(folder: str | Path) -> list[Path]:
    """Exported instance files in ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _format_of(p) is not None)


def _import(path: Path):
    from napari_hemato.core import export as ex

    fmt = _format_of(path)
    reader = {"tiff": ex.import_tiff, "omezarr": ex.import_omezarr,
              "coco": ex.import_coco, "geojson": ex.import_geojson}[fmt]
    return reader(path)


def _find_image(recorded: str | None, export: Path, images: Path | None) -> Path:
    candidates = []
    if recorded:
        candidates.append(Path(recorded))
        name = Path(recorded).name
        candidates.append(export.parent / name)
        if images is not None:
            candidates.append(Path(images) / name)
    for c in candidates:
        if c.exists():
            return c
    tried = ", ".join(str(c) for c in candidates) or "no image path recorded"
    raise FileNotFoundError(f"{export}: cannot find the image it was drawn on (tried {tried}); "
                            "put the image beside the export or pass its folder")


def load_instance_export(path: str | Path, *, images: str | Path | None = None) -> ExportedRegion:
    """Read one exported instance file and the image region under its labels.

    Raises
    ------
    ValueError
        The file holds points, or no label image.
    FileNotFoundError
        The image cannot be found (see module docstring).
    """
    from napari_hemato.core.slide import open_slide

    path = Path(path)
    ann = _import(path)
    if ann.kind != "instances" or ann.labels is None:
        raise ValueError(f"{path}: holds {ann.kind} without a label image; "
                         "the smear and nuclei trainers need instance masks")
    image_path = _find_image(ann.image_path, path, Path(images) if images else None)
    slide = open_slide(image_path, mpp=ann.mpp)
    y0, x0, y1, x1 = ann.box
    image = np.asarray(slide.read_region(0, y0, x0, y1, x1))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8:  # 16-bit or float slides: to the 8-bit scale the models use
        scale = 257.0 if image.dtype == np.uint16 else 255.0 if image.dtype.kind == "f" else 1.0
        image = np.clip(np.round(image / scale if scale != 255.0 else image * 255.0), 0, 255)
        image = image.astype(np.uint8)
    table = ann.table
    ids = table["id"].to_numpy(np.int64)
    classes = dict(zip(ids.tolist(), table["class"].astype(str).tolist(), strict=True))
    reviewed = dict(zip(ids.tolist(), table["reviewed"].astype(bool).tolist(), strict=True)) \
        if "reviewed" in table else {int(i): False for i in ids}
    return ExportedRegion(
        key=f"export/{path.name}",
        image=np.ascontiguousarray(image[..., :3]),
        labels=np.asarray(ann.labels, np.int64),
        classes=classes,
        mpp=float(ann.mpp) if ann.mpp else (slide.mpp if getattr(slide, "mpp", None) else None),
        reviewed=reviewed,
        table=table,
    )


__all__ = ["SUFFIXES", "ExportedRegion", "list_instance_exports", "load_instance_export"]
