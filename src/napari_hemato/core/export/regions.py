"""Instance masks the plugin exported (corrected in review) as training regions.

The Export widget and ``napari-hemato export`` write corrected instances as a
uint32 label TIFF + CSV (``<name>_labels.tif``), OME-Zarr (``<name>.ome.zarr``),
COCO JSON (``<name>_coco.json``) or QuPath GeoJSON (``<name>.geojson``). Each
records the image it was drawn on, the level-0 origin of its label image and
the pixel size. :func:`list_instance_exports` finds them in a folder and
:func:`load_instance_export` reads one back as an image region with its labels
and a class per label, which the smear and nuclei trainers turn into training
images (``napari-hemato train smear|nuclei --data EXPORT_DIR``) and the nucleus
fine-tune reads as corrections (``napari-hemato finetune nuclei --data EXPORT_DIR``).

The image is looked up at its recorded path, then beside the export under the
same file name, then in ``images`` (a folder), so an export folder can move to
another machine together with its images.

No torch here: the base install's fine-tune reads these too.

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

from napari_hemato.core.export.formats import FORMATS

log = logging.getLogger(__name__)

#: export file names by format: the instance formats of the plugin's Export (crops train the
#: WBC classifier instead)
SUFFIXES = {f.name: f.suffix for f in FORMATS.values() if "instances" in f.kinds and f.name != "crops"}


@dataclass
class ExportedRegion:
    """One exported region: level-0 pixels, labels and classes."""

    key: str  # "export/<export file name>"
    image: np.ndarray  # (H, W, 3) uint8, level 0 of the image over the labels' box
    labels: np.ndarray  # (H, W) int64, 0 = background
    classes: dict[int, str]  # label id -> class name
    mpp: float | None  # level-0 µm/px (None when the export did not know it)
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
    from napari_hemato.core.slide import open_slide, to_rgb8

    path = Path(path)
    ann = _import(path)
    if ann.kind != "instances" or ann.labels is None:
        raise ValueError(f"{path}: holds {ann.kind} without a label image; "
                         "the smear and nuclei trainers need instance masks")
    image_path = _find_image(ann.image_path, path, Path(images) if images else None)
    with open_slide(image_path, mpp=ann.mpp) as slide:
        image = to_rgb8(slide.read_region(0, *ann.box))
        mpp = slide.mpp  # the export's, else the image file's own
    ids = ann.table["id"].to_numpy(np.int64).tolist()
    return ExportedRegion(
        key=f"export/{path.name}",
        image=image,
        labels=np.asarray(ann.labels, np.int64),
        classes=dict(zip(ids, ann.table["class"].astype(str).tolist(), strict=True)),
        mpp=mpp,
        table=ann.table,
    )


__all__ = ["SUFFIXES", "ExportedRegion", "list_instance_exports", "load_instance_export"]
