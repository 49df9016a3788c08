"""Blood-smear cell data: VOC boxes -> pseudo instance masks and training targets.

The BCCD dataset has boxes only (``RBC``, ``WBC``, ``Platelets``). Each box
becomes a pseudo-mask on the model grid (:data:`MODEL_MPP`):

- the ellipse inscribed in the box (boxes cut by the image border are first
  extended outwards to the cell's likely full size, then clipped again), so a
  mask's bounding box reproduces the annotated box;
- red cells are intersected with the colour foreground (cell vs. pale
  background, holes filled, convex hull) when that keeps most of the ellipse,
  which follows the outline of deformed cells; WBCs and platelets keep the ellipse (pale WBC
  cytoplasm is close to the background colour; BCCD platelet boxes are loose
  and the mask follows the annotation convention);
- where masks overlap, platelets win over WBCs over RBCs, and two cells of the
  same class split the overlap along the line of equal normalised elliptical
  radius (which separates touching red cells).

BCCD leaves many red cells unannotated. Colour-foreground pixels that belong
to no annotated box are *ignored* (weight 0) in the foreground and distance
losses rather than called background, and class losses only see annotated
cells.

A second source is the plugin's own export layout: a folder of images
``<stem>.png|jpg|tif`` with ``<stem>_label.tif`` (instance labels) and
``<stem>.csv`` (``id,class``), or any instance file the plugin's Export writes
(``*_labels.tif``, ``*.ome.zarr``, ``*_coco.json``, ``*.geojson``, see
:mod:`napari_hemato.core.export.regions`); those masks are complete, so nothing
is ignored.

No torch here: numpy, scipy, scikit-image, pandas, tifffile.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_hemato.train.targets import (
    CLASS_NAMES,
    MODEL_MPP,
    Box,
    colour_foreground,
    complete_box,
    distance_target,
    pseudo_masks,
)

log = logging.getLogger(__name__)

#: assumed pixel size of the BCCD fields (µm/px; BCCD states none; RBC boxes
#: have a median side of ≈100 px, a 7.5–8 µm red cell)
BCCD_MPP = 0.08
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class SmearSample:
    """One training image on the model grid with its pseudo-labels and targets."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32 instance pseudo-masks
    classes: np.ndarray  # (n + 1,) int class index per label id (-1 for id 0 / unknown)
    ignore: np.ndarray  # (H, W) bool, excluded from foreground and distance losses
    boxes: list[Box] = field(default_factory=list)  # model-grid boxes (BCCD only)
    targets: dict[str, np.ndarray] = field(default_factory=dict)


# -- VOC ---------------------------------------------------------------------
def parse_voc(path: str | Path) -> tuple[tuple[int, int], list[Box]]:
    """``((height, width), boxes)`` of a Pascal VOC XML file.

    VOC corners are inclusive 1-based pixel indices; they are returned as
    half-open 0-based boxes ``(ymin - 1, xmin - 1, ymax, xmax)``. Degenerate
    boxes (zero width or height) are dropped.

    Examples
    --------
    >>> shape, boxes = parse_voc("bccd/Annotations/BloodImage_00000.xml")  # doctest: +SKIP
    >>> boxes[0].cls
    'WBC'
    """
    root = ET.parse(path).getroot()
    size = root.find("size")
    shape = (int(size.findtext("height")), int(size.findtext("width")))
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None or name not in CLASS_NAMES:
            continue
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 <= x0 or y1 <= y0:
            continue
        boxes.append(Box(name, max(y0 - 1, 0.0), max(x0 - 1, 0.0), min(y1, shape[0]), min(x1, shape[1])))
    return shape, boxes


def read_split(data_dir: str | Path, name: str) -> list[str]:
    """Image stems of split ``name`` (``ImageSets/<name>.txt`` or ``ImageSets/Main/``)."""
    data_dir = Path(data_dir)
    for path in (data_dir / "ImageSets" / f"{name}.txt", data_dir / "ImageSets" / "Main" / f"{name}.txt"):
        if path.exists():
            return [s.strip() for s in path.read_text().split() if s.strip()]
    raise FileNotFoundError(f"{data_dir}: no ImageSets/{name}.txt or ImageSets/Main/{name}.txt")


def is_voc_folder(data_dir: str | Path) -> bool:
    d = Path(data_dir)
    return (d / "JPEGImages").is_dir() and (d / "Annotations").is_dir()


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file."""
    from skimage.io import imread

    img = np.asarray(imread(str(path)))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) * (255.0 / max(float(img.max()), 1.0)), 0, 255)
    return np.ascontiguousarray(img.astype(np.uint8))


# -- resampling (the engine's work-grid convention) ----------------------------
def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Resample RGB uint8 by ``factor`` input pixels per output pixel, as the engine does.

    Output pixel ``i`` samples input coordinate ``(i + 0.5) * factor - 0.5``
    after a Gaussian anti-aliasing of sigma ``(factor - 1) / 2`` (see
    :class:`napari_hemato.core.geometry.WorkGrid`), so training sees the
    pixels the engine will feed the network.
    """
    if abs(factor - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    oh, ow = math.ceil(h / factor), math.ceil(w / factor)
    ly = (np.arange(oh) + 0.5) * factor - 0.5
    lx = (np.arange(ow) + 0.5) * factor - 0.5
    region = image.astype(np.float32)
    sigma = max(0.0, (factor - 1.0) / 2.0)
    if sigma > 0:
        region = ndi.gaussian_filter(region, sigma=(sigma, sigma, 0), mode="nearest")
    yy, xx = np.meshgrid(ly, lx, indexing="ij")
    out = np.empty((oh, ow, 3), np.uint8)
    for c in range(3):
        v = ndi.map_coordinates(region[..., c], [yy, xx], order=1, mode="nearest")
        out[..., c] = np.clip(np.rint(v), 0, 255)
    return out


def resample_labels(labels: np.ndarray, factor: float) -> np.ndarray:
    """Nearest-neighbour resampling of a label image on the same grid as :func:`resample`."""
    if abs(factor - 1.0) < 1e-6:
        return labels
    h, w = labels.shape
    oh, ow = math.ceil(h / factor), math.ceil(w / factor)
    iy = np.clip(np.rint((np.arange(oh) + 0.5) * factor - 0.5).astype(int), 0, h - 1)
    ix = np.clip(np.rint((np.arange(ow) + 0.5) * factor - 0.5).astype(int), 0, w - 1)
    return labels[np.ix_(iy, ix)]


def make_targets(sample: SmearSample) -> dict[str, np.ndarray]:
    """Dense targets: ``fg``, ``dist``, ``cls`` (−1 = ignore) and ``w`` (fg/dist weight)."""
    lab = sample.labels
    cls = sample.classes[lab]
    cls[lab == 0] = -1
    weight = (~sample.ignore | (lab > 0)).astype(np.float32)
    return {
        "fg": (lab > 0).astype(np.float32),
        "dist": distance_target(lab),
        "cls": cls.astype(np.int64),
        "w": weight,
    }


# -- loading ---------------------------------------------------------------------
def load_bccd_sample(
    data_dir: str | Path, stem: str, *, data_mpp: float = BCCD_MPP, mpp: float = MODEL_MPP,
    targets: bool = True,
) -> SmearSample:
    """One BCCD field resampled to ``mpp`` with its pseudo-masks and ignore region."""
    data_dir = Path(data_dir)
    image = read_rgb(data_dir / "JPEGImages" / f"{stem}.jpg")
    _, boxes = parse_voc(data_dir / "Annotations" / f"{stem}.xml")
    factor = mpp / data_mpp
    img = resample(image, factor)
    boxes = [b.scaled(1.0 / factor) for b in boxes]
    fg = colour_foreground(img, mpp=mpp)
    labels, classes = pseudo_masks(boxes, img.shape[:2], fg, mpp=mpp)
    ring = max(1, int(round(0.4 / mpp)))
    ignore = ndi.binary_dilation(fg, iterations=ring) & (labels == 0)
    # a thin band around every pseudo-mask: its true border is uncertain
    ignore |= ndi.binary_dilation(labels > 0, iterations=ring) & (labels == 0)
    sample = SmearSample(f"bccd/{stem}", img, labels, classes, ignore, boxes)
    if targets:
        sample.targets = make_targets(sample)
    return sample


def load_bccd(data_dir: str | Path, stems: list[str], **kwargs) -> list[SmearSample]:
    return [load_bccd_sample(data_dir, s, **kwargs) for s in stems]


def _tiff_mpp(path: Path) -> float | None:
    """Pixel size (µm) stored in a TIFF's resolution tags, if any."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        if "XResolution" not in tags or "ResolutionUnit" not in tags:
            return None
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
    if not num or unit not in (2, 3):
        return None
    per_unit = num / den
    um = 25400.0 if unit == 2 else 10000.0
    mpp = um / per_unit
    return mpp if 0.01 < mpp < 10 else None


def list_export_stems(folder: str | Path) -> list[Path]:
    """Images of an export folder that have ``<stem>_label.tif`` and ``<stem>.csv``."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.stem.endswith("_label"):
            continue
        if (folder / f"{p.stem}_label.tif").exists() and (folder / f"{p.stem}.csv").exists():
            out.append(p)
    return out


def load_export_sample(
    path: Path, *, default_mpp: float = BCCD_MPP, mpp: float = MODEL_MPP, targets: bool = True
) -> SmearSample:
    """An image + ``<stem>_label.tif`` + ``<stem>.csv`` (``id,class``) triple (complete masks)."""
    import pandas as pd
    import tifffile

    image = read_rgb(path)
    lab_path = path.with_name(f"{path.stem}_label.tif")
    labels = np.asarray(tifffile.imread(lab_path)).astype(np.int64)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{lab_path}: shape {labels.shape} != image {image.shape[:2]}")
    table = pd.read_csv(path.with_name(f"{path.stem}.csv"))
    if not {"id", "class"} <= set(table.columns):
        raise ValueError(f"{path.stem}.csv: needs columns 'id' and 'class'")
    names = dict(zip(table["id"].astype(np.int64), table["class"].astype(str), strict=True))
    return _sample(f"export/{path.stem}", image, labels, names, _tiff_mpp(lab_path) or default_mpp,
                   mpp=mpp, targets=targets)


def load_instance_export_sample(path: Path, *, default_mpp: float = BCCD_MPP,
                                mpp: float = MODEL_MPP, images: Path | None = None,
                                targets: bool = True) -> SmearSample:
    """A corrected smear exported by the plugin (label TIFF, OME-Zarr, COCO or GeoJSON).

    The class of each object is its ``cell_type`` (RBC / WBC / Platelets) when the
    table has one (the smear pipeline puts the WBC subtype in ``class``), else its
    ``class``; objects of any other class are ignored in the losses.
    """
    from napari_hemato.core.export.regions import load_instance_export

    region = load_instance_export(path, images=images)
    names = dict(region.classes)
    if "cell_type" in region.table:
        ids = region.table["id"].astype(np.int64).tolist()
        for i, c in zip(ids, region.table["cell_type"].astype(str).tolist(), strict=True):
            if c in CLASS_NAMES:
                names[i] = c
    return _sample(region.key, region.image, region.labels, names, region.mpp or default_mpp,
                   mpp=mpp, targets=targets)


def _sample(key: str, image: np.ndarray, labels: np.ndarray, names: dict, data_mpp: float, *,
            mpp: float, targets: bool) -> SmearSample:
    factor = mpp / data_mpp
    img = resample(image, factor)
    lab = resample_labels(labels, factor)
    ids, inverse = np.unique(lab, return_inverse=True)
    lab = inverse.reshape(lab.shape).astype(np.int32)
    if ids[0] != 0:
        lab += 1
        ids = np.concatenate([[0], ids])
    classes = np.array([-1] + [CLASS_NAMES.index(names[i]) if names.get(i) in CLASS_NAMES else -1
                               for i in ids[1:].tolist()], np.int64)
    unknown = classes[lab] < 0
    ignore = unknown & (lab > 0)
    lab = np.where(unknown, 0, lab).astype(np.int32)
    sample = SmearSample(key, img, lab, classes, ignore)
    if targets:
        sample.targets = make_targets(sample)
    return sample


# -- training sets -------------------------------------------------------------
#: every ``TUNE_EVERY``-th image of the BCCD train list tunes post-processing (not trained on)
TUNE_EVERY = 8


def split_stems(data_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(train, tune, val) stems: BCCD's own lists; every 8th train image tunes."""
    train = read_split(data_dir, "train")
    val = read_split(data_dir, "val")
    overlap = set(train) & set(val)
    if overlap:
        raise ValueError(f"{data_dir}: {len(overlap)} images are in both train and val")
    tune = train[TUNE_EVERY - 1 :: TUNE_EVERY]
    tune_set = set(tune)
    return [s for s in train if s not in tune_set], tune, val


def load_training_data(data_dirs, *, limit: int | None = None):
    """Training and tuning samples from BCCD-layout and export-layout folders."""
    train, tune, val_stems = [], [], []
    for d in data_dirs:
        d = Path(d)
        if is_voc_folder(d):
            tr, tu, va = split_stems(d)
            if limit:
                tr, tu = tr[:limit], tu[: max(1, limit // 4)]
            train += load_bccd(d, tr)
            tune += load_bccd(d, tu)
            val_stems += va
        else:
            from napari_hemato.core.export.regions import list_instance_exports

            paths = list_export_stems(d)
            exported = list_instance_exports(d)
            if not paths and not exported:
                raise FileNotFoundError(f"{d}: neither a VOC folder nor an export folder")
            train += [load_export_sample(p) for p in paths[:limit or None]]
            train += [load_instance_export_sample(p) for p in exported[:limit or None]]
    if not train:
        raise ValueError("no training images")
    return train, tune, val_stems


__all__ = [
    "TUNE_EVERY",
    "load_training_data",
    "split_stems",
    "BCCD_MPP",
    "CLASS_NAMES",
    "MODEL_MPP",
    "Box",
    "SmearSample",
    "colour_foreground",
    "complete_box",
    "distance_target",
    "is_voc_folder",
    "list_export_stems",
    "load_bccd",
    "load_bccd_sample",
    "load_export_sample",
    "load_instance_export_sample",
    "make_targets",
    "parse_voc",
    "pseudo_masks",
    "read_rgb",
    "read_split",
    "resample",
    "resample_labels",
]
