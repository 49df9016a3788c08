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
:mod:`napari_hemato.train.data_export`); those masks are complete, so nothing
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

log = logging.getLogger(__name__)

CLASS_NAMES = ("RBC", "WBC", "Platelets")
#: assumed pixel size of the BCCD fields (µm/px; BCCD states none; RBC boxes
#: have a median side of ≈100 px, a 7.5–8 µm red cell)
BCCD_MPP = 0.08
#: the model works at 2× downsampled BCCD fields
MODEL_MPP = 0.16
#: mask priority when masks overlap (higher wins)
PRIORITY = {"RBC": 0, "WBC": 1, "Platelets": 2}
#: typical box side (µm) used to complete boxes cut by the image border
TYPICAL_SIZE_UM = {"RBC": 8.2, "WBC": 15.0, "Platelets": 3.2}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Box:
    """One annotated box, half-open pixel coordinates ``(y0, x0, y1, x1)``."""

    cls: str
    y0: float
    x0: float
    y1: float
    x1: float

    def scaled(self, f: float) -> Box:
        return Box(self.cls, self.y0 * f, self.x0 * f, self.y1 * f, self.x1 * f)

    @property
    def yxyx(self) -> tuple[float, float, float, float]:
        return (self.y0, self.x0, self.y1, self.x1)


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


# -- colour foreground ---------------------------------------------------------
def colour_foreground(image: np.ndarray, *, mpp: float = MODEL_MPP) -> np.ndarray:
    """Cells (any class) vs. the pale smear background, holes filled.

    The background is the brightest, least saturated part of a field. Its
    colour is estimated from the 30 % brightest pixels; a pixel is foreground
    when its smoothed colour is darker than that in green/blue (haemoglobin,
    eosin and nuclear stain all absorb there) by more than an Otsu cut-off
    (bounded to 10–40 grey levels), or clearly more saturated.
    """
    from skimage.filters import threshold_otsu

    img = ndi.gaussian_filter(image.astype(np.float32), sigma=(1.0, 1.0, 0))
    gb = 0.5 * (img[..., 1] + img[..., 2])
    bright = gb >= np.percentile(gb, 70)
    bg = np.median(img[bright], axis=0)
    dark = 0.5 * (bg[1] + bg[2]) - gb
    sat = img.max(-1) - img.min(-1)
    bg_sat = float(np.percentile(sat[bright], 50))
    try:
        t = float(threshold_otsu(dark))
    except ValueError:
        t = 15.0
    t = float(np.clip(t, 10.0, 40.0))
    fg = (dark > t) | (sat - bg_sat > 2.0 * t)
    r = max(1, int(round(0.3 / mpp)))
    fg = ndi.binary_opening(fg, iterations=r)
    fg = ndi.binary_closing(fg, iterations=r)
    fg = ndi.binary_fill_holes(fg)
    return fg


# -- pseudo masks ----------------------------------------------------------------
def complete_box(box: Box, shape: tuple[int, int], mpp: float) -> Box:
    """Extend a box cut by the image border to a plausible full cell (may leave the image)."""
    h, w = shape
    y0, x0, y1, x1 = box.yxyx
    bh, bw = y1 - y0, x1 - x0
    typical = TYPICAL_SIZE_UM[box.cls] / mpp
    at_top, at_bottom, at_left, at_right = y0 <= 1, y1 >= h - 1, x0 <= 1, x1 >= w - 1
    cut_y, cut_x = at_top or at_bottom, at_left or at_right
    target_h = bh if not cut_y else max(bh, bw if not cut_x else typical)
    target_w = bw if not cut_x else max(bw, bh if not cut_y else typical)
    if cut_y and not (at_top and at_bottom):
        if at_top:
            y0 = y1 - target_h
        else:
            y1 = y0 + target_h
    if cut_x and not (at_left and at_right):
        if at_left:
            x0 = x1 - target_w
        else:
            x1 = x0 + target_w
    return Box(box.cls, y0, x0, y1, x1)


def _ellipse_radius(box: Box, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Normalised elliptical radius (< 1 inside) of the ellipse inscribed in ``box``."""
    h, w = shape
    y0, x0, y1, x1 = box.yxyx
    sl = (slice(max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), h)),
          slice(max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), w)))
    cy, cx = 0.5 * (y0 + y1) - 0.5, 0.5 * (x0 + x1) - 0.5
    ry, rx = max(0.5 * (y1 - y0), 0.5), max(0.5 * (x1 - x0), 0.5)
    yy = (np.arange(sl[0].start, sl[0].stop, dtype=np.float32) - cy) / ry
    xx = (np.arange(sl[1].start, sl[1].stop, dtype=np.float32) - cx) / rx
    return sl, np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)


def pseudo_masks(
    boxes: list[Box], shape: tuple[int, int], fg: np.ndarray | None, *, mpp: float = MODEL_MPP,
    min_colour_fraction: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance pseudo-masks from boxes on a grid of ``shape``.

    Parameters
    ----------
    boxes : list of Box
        Boxes in the grid's pixel coordinates.
    shape : (int, int)
        Grid shape.
    fg : (H, W) bool, optional
        Colour foreground (:func:`colour_foreground`); refines RBC masks.
    mpp : float
        Grid pixel size (µm/px), to complete boxes cut by the border.
    min_colour_fraction : float
        An RBC mask is ``ellipse ∩ fg`` only if that keeps this fraction of
        the ellipse; otherwise the ellipse.

    Returns
    -------
    labels : (H, W) int32
        Instance ids 1..n in box order (a box may end up with no pixels).
    classes : (n + 1,) int
        Class index (into :data:`CLASS_NAMES`) per id; ``classes[0] = -1``.

    Examples
    --------
    >>> lab, cls = pseudo_masks([Box("WBC", 2, 2, 12, 12)], (16, 16), None)
    >>> int(lab.max()), cls.tolist()
    (1, [-1, 1])
    """
    from skimage.morphology import convex_hull_image

    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)  # (priority rank, radius) packed into one key
    classes = np.full(len(boxes) + 1, -1, np.int64)
    for k, box in enumerate(boxes, start=1):
        classes[k] = CLASS_NAMES.index(box.cls)
        full = complete_box(box, shape, mpp)
        sl, r = _ellipse_radius(full, shape)
        if r.size == 0:
            continue
        inside = r < 1.0
        if box.cls == "RBC" and fg is not None:
            refined = inside & fg[sl]
            if refined.sum() >= min_colour_fraction * inside.sum():
                refined = ndi.binary_fill_holes(refined)
                lab, n = ndi.label(refined)
                if n > 1:
                    sizes = np.bincount(lab.ravel())[1:]
                    refined = lab == (1 + int(np.argmax(sizes)))
                # convex: pale centres open to the rim must not notch the mask
                inside = convex_hull_image(refined) & inside
        key = np.where(inside, (2 - PRIORITY[box.cls]) * 10.0 + r, np.inf).astype(np.float32)
        win = key < best[sl]
        best[sl][win] = key[win]
        labels[sl][win] = k
    # keep the largest piece of each id (overlap rules can cut a mask in two)
    for k, s in enumerate(ndi.find_objects(labels), start=1):
        if s is None:
            continue
        m = labels[s] == k
        lab, n = ndi.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            labels[s][m & (lab != 1 + int(np.argmax(sizes)))] = 0
    return labels, classes


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-object distance to the object's border, scaled to 1 at its centre.

    Each object is measured on its own mask, so the map falls to ~0 where two
    cells touch and its local maxima give one watershed seed per cell.
    """
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        m = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        top = d.max()
        if top > 0:
            out[sl][m] = (d[m] / top).astype(np.float32)
    return out


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
    from napari_hemato.train.data_export import load_instance_export

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


__all__ = [
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
