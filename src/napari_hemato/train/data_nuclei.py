"""Nucleus instance data: loading, resampling to the model's µm/px, targets, split.

Sources (folders of ``X.png`` + ``X_label.tif`` under the data folder):

- ``nuclei_he_miccai``: H&E tiles at 20× (``image01``–``image07``, ≈0.5 µm/px)
  and 40× (``image08``–``image15``, ≈0.25 µm/px).
- ``nuclei_dsb2018_brightfield``: stained-tissue brightfield images of unknown
  pixel size. Each image gets a *nominal* pixel size chosen so that its median
  nucleus diameter becomes :data:`TARGET_MEDIAN_DIAMETER_PX` at the model's
  0.5 µm/px (the median of the MICCAI 20× tiles), see :func:`dsb_mpp`.

The plugin's own exports of corrected nuclei (label TIFF, OME-Zarr, COCO,
GeoJSON) are read by :func:`load_export_images` and join the training images.

No torch here: numpy, scipy, scikit-image, tifffile.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from skimage.io import imread

from napari_hemato.core.resample import labels_to_original, to_model_grid  # noqa: F401 - re-exported
from napari_hemato.train.targets import distance_target

log = logging.getLogger(__name__)

MODEL_MPP = 0.5
MICCAI = "nuclei_he_miccai"
DSB = "nuclei_dsb2018_brightfield"
SOURCES = (MICCAI, DSB)
#: median equivalent diameter (px) of MICCAI nuclei at 0.5 µm/px (6.5 µm)
TARGET_MEDIAN_DIAMETER_PX = 13.0
#: held-out MICCAI tiles (one 20×, one 40×)
MICCAI_VALIDATION = ("image04", "image14")
#: fraction of DSB images held out (chosen by a seeded permutation of sorted ids)
DSB_VALIDATION_FRACTION = 0.2
DSB_SPLIT_SEED = 2018
#: training images set aside to tune the post-processing (never trained on, never scored)
MICCAI_TUNE = ("image10",)
DSB_TUNE_FRACTION = 0.12


@dataclass
class NucleusImage:
    """One image with instance labels, resampled to :data:`MODEL_MPP`."""

    key: str  # "<source>/<stem>"
    image: np.ndarray  # (H, W, 3) uint8 at MODEL_MPP
    labels: np.ndarray  # (H, W) int32 at MODEL_MPP
    mpp: float  # pixel size of the original file
    original_shape: tuple[int, int]
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.key.split("/", 1)[0]


def miccai_mpp(stem: str) -> float:
    """0.5 µm/px for ``image01``–``image07`` (20×), 0.25 for ``image08``+ (40×)."""
    m = re.search(r"(\d+)$", stem)
    if m is None:
        raise ValueError(f"{stem}: not a MICCAI tile name (imageNN)")
    return 0.5 if int(m.group(1)) <= 7 else 0.25


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the objects of a label image."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return float("nan")
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def dsb_mpp(labels: np.ndarray) -> float:
    """Nominal µm/px of a DSB image from its nucleus sizes (clipped to 0.1–0.75)."""
    d = median_diameter(labels)
    if not np.isfinite(d):
        return MODEL_MPP
    return float(np.clip(MODEL_MPP * TARGET_MEDIAN_DIAMETER_PX / d, 0.1, 0.75))


def read_pair(path_png: Path) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and int32 labels of ``X.png`` / ``X_label.tif``."""
    img = imread(path_png)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    lab = tifffile.imread(path_png.with_name(path_png.stem + "_label.tif")).astype(np.int32)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"{path_png}: label shape {lab.shape} != image {img.shape[:2]}")
    return img, lab


def image_mpp(key: str, labels: np.ndarray) -> float:
    """Pixel size of an image in the data folder (see module docstring)."""
    source, stem = key.split("/", 1)
    if source == MICCAI:
        return miccai_mpp(stem)
    return dsb_mpp(labels)


def make_targets(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"fg": (labels > 0).astype(np.float32), "dist": distance_target(labels)}


def list_keys(data_dir: str | Path) -> list[str]:
    """All ``<source>/<stem>`` keys with an image + label pair, sorted."""
    data_dir = Path(data_dir)
    keys = []
    for source in SOURCES:
        folder = data_dir / source
        if not folder.is_dir():
            continue
        for png in sorted(folder.glob("*.png")):
            if (folder / f"{png.stem}_label.tif").exists():
                keys.append(f"{source}/{png.stem}")
    if not keys:
        raise FileNotFoundError(f"{data_dir}: no nucleus image/label pairs in {SOURCES}")
    return keys


def split_keys(keys: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation) keys, held out by image (see module constants)."""
    val = [k for k in keys if k.split("/", 1)[0] == MICCAI and k.split("/")[1] in MICCAI_VALIDATION]
    dsb = sorted(k for k in keys if k.split("/", 1)[0] == DSB)
    if dsb:
        rng = np.random.default_rng(DSB_SPLIT_SEED)
        n_val = max(1, int(round(DSB_VALIDATION_FRACTION * len(dsb))))
        pick = rng.permutation(len(dsb))[:n_val]
        val += [dsb[i] for i in sorted(pick)]
    vs = set(val)
    return [k for k in keys if k not in vs], sorted(val)


def split_tune(train_keys: list[str]) -> tuple[list[str], list[str]]:
    """(train, tune): :data:`MICCAI_TUNE` and a seeded :data:`DSB_TUNE_FRACTION` of the DSB
    training images tune the post-processing; at least one image is always left to train.

    Examples
    --------
    >>> split_tune(["nuclei_he_miccai/image01", "nuclei_he_miccai/image10"])
    (['nuclei_he_miccai/image01'], ['nuclei_he_miccai/image10'])
    """
    tune = [k for k in train_keys if k.split("/", 1)[0] == MICCAI and k.split("/")[1] in MICCAI_TUNE]
    dsb = sorted(k for k in train_keys if k.split("/", 1)[0] == DSB)
    if len(dsb) >= 4:
        rng = np.random.default_rng(DSB_SPLIT_SEED + 1)
        n = max(1, int(round(DSB_TUNE_FRACTION * len(dsb))))
        tune += [dsb[i] for i in sorted(rng.permutation(len(dsb))[:n])]
    if len(tune) >= len(train_keys):
        tune = []
    ts = set(tune)
    return [k for k in train_keys if k not in ts], sorted(tune)


def load_image(data_dir: str | Path, key: str, *, targets: bool = True) -> NucleusImage:
    """Read one image + labels and resample them to :data:`MODEL_MPP`."""
    source, stem = key.split("/", 1)
    img, lab = read_pair(Path(data_dir) / source / f"{stem}.png")
    mpp = image_mpp(key, lab)
    im, lb = to_model_grid(img, lab, mpp, MODEL_MPP)
    item = NucleusImage(key, im, lb, mpp, img.shape[:2])
    if targets:
        item.targets = make_targets(lb)
    return item


def load_images(data_dir: str | Path, keys: list[str], *, targets: bool = True):
    return [load_image(data_dir, k, targets=targets) for k in keys]


def is_reference_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds one of :data:`SOURCES` (else it may be an export folder)."""
    return any((Path(folder) / s).is_dir() for s in SOURCES)


def load_export_images(folder: str | Path, *, images: str | Path | None = None,
                       targets: bool = True) -> list[NucleusImage]:
    """The plugin's exported (corrected) nucleus masks in ``folder`` as training images.

    Every labelled object is a nucleus; the region is resampled to :data:`MODEL_MPP`
    from the pixel size the export recorded (see :mod:`napari_hemato.core.export.regions`).
    """
    from napari_hemato.core.export.regions import list_instance_exports, load_instance_export

    paths = list_instance_exports(folder)
    if not paths:
        raise FileNotFoundError(f"{folder}: no {'/'.join(SOURCES)} folders and no exported "
                                "instance files (*_labels.tif, *.ome.zarr, *_coco.json, *.geojson)")
    items = []
    for path in paths:
        region = load_instance_export(path, images=images)
        if not region.mpp:
            raise ValueError(f"{path}: the export has no pixel size; re-export it from an image "
                             "whose µm/px is known (or typed in the Analyse widget)")
        im, lb = to_model_grid(region.image, region.labels.astype(np.int32), region.mpp, MODEL_MPP)
        item = NucleusImage(region.key, im, lb, region.mpp, region.image.shape[:2])
        if targets:
            item.targets = make_targets(lb)
        items.append(item)
        log.info("%s: %d nuclei at %.3f µm/px", region.key, len(np.unique(lb)) - 1, region.mpp)
    return items


__all__ = [
    "MODEL_MPP",
    "NucleusImage",
    "dsb_mpp",
    "distance_target",
    "image_mpp",
    "labels_to_original",
    "is_reference_folder",
    "list_keys",
    "load_export_images",
    "load_image",
    "load_images",
    "make_targets",
    "median_diameter",
    "miccai_mpp",
    "split_keys",
    "to_model_grid",
]
