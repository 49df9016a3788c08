"""Mitosis data: AMi-Br crops, negative H&E tissue, split by slide, evaluation mosaics.

Positives are 128×128 crops at 0.25 µm/px centred on a mitotic figure
(``mitosis_ami_br/crops.csv``: ``slide, dataset, uid, x, y, ..., majority_atypical,
file``); the figure is at the crop centre. Optionally, ``points.csv`` files
written by the plugin (``y_px, x_px, class``) next to an image add crops cut
around each point (see :func:`load_points_crops`).

Negatives are H&E images without mitosis labels (:func:`tissue_sources`: the
fixed :data:`TISSUE_SOURCES` plus every DSB 2018 stained-tissue image found, each
with its pixel size, its tissue group and the part held out). The held-out parts
are split into ``tune`` (checkpoint, threshold) and ``test`` (reported numbers)
tissue. They are *not* verified to be mitosis-free: a rare mitosis there is
label noise.

Validation mosaics are made from these by :mod:`napari_hemato.train.mosaics`.

No torch here: numpy, pandas, scikit-image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.io import imread
from skimage.transform import resize

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "atypical")
CROP_MPP = 0.25
AMIBR = "mitosis_ami_br"
#: fraction of slides per dataset held out (half tunes the threshold, half is the test set)
VAL_FRACTION = 0.2
SPLIT_SEED = 1905
#: slides with more crops than this are never held out
MAX_HELD_OUT_CROPS = 60
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class TissueSource:
    """An H&E image used as negative tissue.

    ``holdout`` is ``"all"`` (the whole image is validation), ``"none"``
    (training only), or ``"rows>=F"`` / ``"cols>=F"`` (that fraction of the image is
    validation, the rest training). ``role`` says which held-out set the validation
    part belongs to: ``"tune"`` (checkpoint and threshold) or ``"test"`` (reported
    numbers). ``mpp_note`` says where the pixel size comes from; ``group`` names the
    kind of tissue for per-group reports.
    """

    key: str
    path: str
    mpp: float
    holdout: str
    mpp_note: str = "stated"
    group: str = ""
    role: str = "test"


TISSUE_SOURCES: tuple[TissueSource, ...] = (
    *(
        TissueSource(f"miccai/image{i:02d}", f"nuclei_he_miccai/image{i:02d}.png",
                     0.5 if i <= 7 else 0.25, "all" if i in (4, 14) else "none",
                     "20x, ~0.5" if i <= 7 else "40x, ~0.25", "miccai",
                     "tune" if i == 4 else "test")
        for i in (1, 3, 4, 5, 7, 8, 10, 11, 13, 14)
    ),
    TissueSource("cmu_small_region", "slides/cmu_small_region.svs", 0.499, "rows>=0.62",
                 group="cmu", role="test"),
    TissueSource("he_skin", "slides/he_skin.tif", 0.65, "cols>=0.5",
                 "estimated from nucleus size vs the SVS skin", "skin", "tune"),
    TissueSource("he_histo_stardist", "slides/he_histo_stardist.jpg", 0.5, "none",
                 "estimated from nucleus size", "stardist"),
)
#: DSB 2018 stained-tissue tiles (haematoxylin-heavy, several organs; nucleus masks give
#: their scale): this fraction held out, alternately tune and test, by a seeded permutation
DSB_DIR = "nuclei_dsb2018_brightfield"
DSB_HELD_OUT = 0.3
DSB_SEED = 4242


def dsb_sources(data_dir: str | Path) -> list[TissueSource]:
    """A :class:`TissueSource` per DSB image under ``data_dir`` (none if absent).

    The pixel size comes from the image's nucleus masks
    (:func:`napari_hemato.train.data_nuclei.dsb_mpp`); ``DSB_HELD_OUT`` of the
    sorted images (seeded permutation) are held out whole, alternately ``tune``
    and ``test``.
    """
    import tifffile

    from napari_hemato.train.data_nuclei import dsb_mpp

    folder = Path(data_dir) / DSB_DIR
    files = sorted(p for p in folder.glob("*.png")) if folder.is_dir() else []
    order = np.random.default_rng(DSB_SEED).permutation(len(files))
    held = [int(i) for i in order[: int(round(DSB_HELD_OUT * len(files)))]]
    role = {i: ("tune" if k % 2 == 0 else "test") for k, i in enumerate(held)}
    out = []
    for i, png in enumerate(files):
        label = png.with_name(png.stem + "_label.tif")
        mpp = dsb_mpp(tifffile.imread(label)) if label.is_file() else 0.5
        out.append(TissueSource(f"dsb/{png.stem[:12]}", f"{DSB_DIR}/{png.name}", round(mpp, 4),
                                "all" if i in role else "none", "from nucleus size", "dsb",
                                role.get(i, "test")))
    return out


def tissue_sources(data_dir: str | Path) -> list[TissueSource]:
    """:data:`TISSUE_SOURCES` plus :func:`dsb_sources` (only those whose file exists)."""
    srcs = [*TISSUE_SOURCES, *dsb_sources(data_dir)]
    return [s for s in srcs if (Path(data_dir) / s.path).is_file()]


# -- crops ---------------------------------------------------------------------------------
@dataclass
class Crops:
    """Positive crops resampled to a model pixel size.

    ``images`` (n, s, s, 3) uint8; ``centres`` (n, 2) figure position (row, col)
    in crop pixels; ``labels`` (n,) 0 = normal, 1 = atypical; ``slides`` and
    ``datasets`` (n,) str; ``names`` (n,) an id per crop.
    """

    images: np.ndarray
    centres: np.ndarray
    labels: np.ndarray
    slides: np.ndarray
    datasets: np.ndarray
    names: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask) -> Crops:
        idx = np.flatnonzero(np.asarray(mask)) if np.asarray(mask).dtype == bool else mask
        return Crops(*(getattr(self, f)[idx] for f in
                       ("images", "centres", "labels", "slides", "datasets", "names")))

    @staticmethod
    def concat(parts: list[Crops]) -> Crops:
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_crops()
        fields = ("images", "centres", "labels", "slides", "datasets", "names")
        return Crops(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def empty_crops(size: int = 128) -> Crops:
    return Crops(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2)), np.zeros(0, int),
                 np.zeros(0, object), np.zeros(0, object), np.zeros(0, object))


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Resample a uint8 RGB image by ``factor`` (linear, anti-aliased when shrinking)."""
    if abs(factor - 1) < 1e-3:
        return img
    shape = (max(1, round(img.shape[0] * factor)), max(1, round(img.shape[1] * factor)))
    out = resize(img, shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file (PNG/JPEG/TIFF/SVS level 0) as (H, W, 3) uint8."""
    path = Path(path)
    if path.suffix.lower() == ".svs":
        from napari_hemato.core.slide import open_slide, to_rgb8

        with open_slide(path) as slide:
            return to_rgb8(slide.read_region(0, 0, 0, *slide.shape))
    img = imread(path)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def find_crops_csv(data_dir: str | Path) -> Path | None:
    """``crops.csv`` in ``data_dir`` or in ``data_dir/mitosis_ami_br`` (None if absent)."""
    data_dir = Path(data_dir)
    for p in (data_dir / "crops.csv", data_dir / AMIBR / "crops.csv"):
        if p.is_file():
            return p
    return None


def read_crops_table(data_dir: str | Path) -> pd.DataFrame:
    """The AMi-Br crop table with an absolute ``path`` column."""
    csv = find_crops_csv(data_dir)
    if csv is None:
        return pd.DataFrame(columns=["slide", "dataset", "uid", "file", "majority_atypical", "path"])
    frame = pd.read_csv(csv)
    missing = {"slide", "file", "majority_atypical"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)}")
    if "dataset" not in frame:
        frame["dataset"] = "unknown"
    frame["slide"] = frame["dataset"].astype(str) + "/" + frame["slide"].astype(str)
    frame["path"] = [str(csv.parent / f) for f in frame["file"]]
    frame["majority_atypical"] = frame["majority_atypical"].astype(str).str.lower() == "true"
    return frame


def load_crops(frame: pd.DataFrame, *, mpp: float = CROP_MPP) -> Crops:
    """Read the crops of ``frame`` (from :func:`read_crops_table`) at ``mpp``."""
    if len(frame) == 0:
        return empty_crops(round(128 * CROP_MPP / mpp))
    f = CROP_MPP / mpp
    images = np.stack([rescale(read_rgb(p), f) for p in frame["path"]])
    c = (64 + 0.5) * f - 0.5  # the figure is at pixel (64, 64) of a 128-px crop
    centres = np.full((len(frame), 2), c, np.float64)
    names = (frame["dataset"].astype(str) + "_" + frame.get("uid", frame.index).astype(str))
    return Crops(images, centres, frame["majority_atypical"].to_numpy().astype(int),
                 frame["slide"].to_numpy(object), frame["dataset"].to_numpy(object),
                 names.to_numpy(object))


def _points_image(csv: Path) -> Path | None:
    stem = csv.name[: -len("points.csv")].rstrip("._-")
    cands = [p for p in sorted(csv.parent.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if stem:
        cands = [p for p in cands if p.stem == stem]
    return cands[0] if len(cands) == 1 else None


def load_points_crops(data_dir: str | Path, *, mpp: float = CROP_MPP, default_mpp: float = 0.25,
                      size_um: float = 32.0) -> Crops:
    """Crops around points from ``*points.csv`` files (the plugin's points export).

    A file ``points.csv`` (or ``<stem>.points.csv``) needs columns ``y_px, x_px``
    and optionally ``class`` (``atypical`` or anything else = normal) and
    ``y_um``; it belongs to the only image in its folder (or ``<stem>.*``). The
    pixel size comes from ``y_um / y_px`` or ``default_mpp``. The image is the
    "slide" of its crops for the split.
    """
    parts = []
    for csv in sorted(Path(data_dir).rglob("*points.csv")):
        image = _points_image(csv)
        table = pd.read_csv(csv)
        if image is None or not {"y_px", "x_px"} <= set(table.columns) or len(table) == 0:
            log.warning("%s: skipped (needs y_px, x_px and exactly one image beside it)", csv)
            continue
        src_mpp = default_mpp
        if "y_um" in table and table["y_um"].notna().any():
            ratio = (table["y_um"] / table["y_px"]).to_numpy(float)
            ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
            src_mpp = float(np.median(ratio)) if ratio.size else default_mpp
        img = rescale(read_rgb(image), src_mpp / mpp)
        half = int(round(size_um / mpp / 2))
        padded = np.pad(img, ((half, half), (half, half), (0, 0)), constant_values=255)
        cy = np.rint(table["y_px"].to_numpy(float) * src_mpp / mpp).astype(int)
        cx = np.rint(table["x_px"].to_numpy(float) * src_mpp / mpp).astype(int)
        ims = np.stack([padded[y : y + 2 * half, x : x + 2 * half] for y, x in zip(cy, cx, strict=True)])
        cls = table.get("class", pd.Series(["normal"] * len(table))).astype(str).str.lower()
        n = len(table)
        parts.append(Crops(ims, np.tile([[half, half]], (n, 1)).astype(float),
                           (cls == "atypical").to_numpy().astype(int),
                           np.full(n, f"points/{image.name}", object), np.full(n, "points", object),
                           np.array([f"{image.stem}_{i}" for i in range(n)], object)))
    return Crops.concat(parts)


def split_slides(slides, datasets, *, fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED,
                 max_crops: int = MAX_HELD_OUT_CROPS) -> dict[str, list[str]]:
    """Slides for ``train``, ``tune`` and ``test``, held out per dataset.

    Within each dataset the sorted slide ids are permuted with ``seed``; the
    first ``round(fraction * n)`` (at least 2 when the dataset has 4 or more
    slides) among the slides with at most ``max_crops`` crops are held out and
    dealt alternately to ``tune`` and ``test`` (so that no single slide
    dominates a validation set; the few larger slides always train).
    """
    slides = np.asarray(slides).astype(str)
    datasets = np.asarray(datasets).astype(str)
    pairs = sorted(set(zip(datasets, slides, strict=True)))
    count = {s: int(n) for s, n in zip(*np.unique(slides, return_counts=True), strict=True)}
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"train": [], "tune": [], "test": []}
    for ds in sorted({d for d, _ in pairs}):
        ids = sorted(s for d, s in pairs if d == ds)
        n_val = int(round(fraction * len(ids)))
        if len(ids) >= 4:
            n_val = max(n_val, 2)
        order = [i for i in rng.permutation(len(ids)) if count[ids[i]] <= max_crops]
        held = [ids[i] for i in order[:n_val]]
        order = [i for i in range(len(ids)) if ids[i] not in held]
        out["tune"] += held[0::2]
        out["test"] += held[1::2]
        out["train"] += [ids[i] for i in order]
    return {k: sorted(v) for k, v in out.items()}


# -- tissue --------------------------------------------------------------------------------
@dataclass
class TissueRegion:
    """A region of a tissue source: ``box`` (y0, x0, y1, x1) in the file's own pixels,
    ``image`` that region resampled to ``mpp``."""

    source: TissueSource
    box: tuple[int, int, int, int]
    image: np.ndarray
    mpp: float


def region_box(shape, holdout: str, part: str) -> tuple[int, int, int, int] | None:
    """The (y0, x0, y1, x1) of the ``part`` ("train"/"val") of an image, or None."""
    h, w = shape[:2]
    if holdout in ("all", "none"):
        is_val = holdout == "all"
        return (0, 0, h, w) if is_val == (part == "val") else None
    axis, frac = holdout.split(">=")
    cut = int(round(float(frac) * (h if axis == "rows" else w)))
    if axis == "rows":
        return (cut, 0, h, w) if part == "val" else (0, 0, cut, w)
    return (0, cut, h, w) if part == "val" else (0, 0, h, cut)


def tissue_regions(data_dir: str | Path, *, part: str, mpp: float) -> list[TissueRegion]:
    """Negative tissue regions of ``part`` under ``data_dir``.

    ``part`` is ``"train"``, ``"val"`` (every held-out part), or ``"tune"`` /
    ``"test"`` (the held-out parts of that :attr:`TissueSource.role`).
    """
    if part not in ("train", "val", "tune", "test"):
        raise ValueError(f"part must be train, val, tune or test, not {part!r}")
    out = []
    for src in tissue_sources(data_dir):
        if part in ("tune", "test") and src.role != part:
            continue
        which = "train" if part == "train" else "val"
        if region_box((1, 1), src.holdout, which) is None:
            continue  # wholly in the other part: not read at all
        img = read_rgb(Path(data_dir) / src.path)
        box = region_box(img.shape, src.holdout, which)
        if box is None:
            continue
        y0, x0, y1, x1 = box
        out.append(TissueRegion(src, box, rescale(img[y0:y1, x0:x1], src.mpp / mpp), mpp))
    return out


def tissue_mask(img: np.ndarray) -> np.ndarray:
    """Pixels that are stained tissue (optical density sum above 0.25)."""
    od = -np.log(np.clip(img.astype(np.float32), 1, 255) / 255.0)
    return od.sum(axis=-1) > 0.25


def tissue_mm2(img: np.ndarray, mpp: float) -> float:
    """Stained tissue area (:func:`tissue_mask`) of an image at ``mpp`` µm/px, in mm²."""
    return float(tissue_mask(img).sum()) * mpp**2 / 1e6


__all__ = [
    "CLASS_NAMES",
    "CROP_MPP",
    "Crops",
    "TISSUE_SOURCES",
    "TissueRegion",
    "TissueSource",
    "dsb_sources",
    "find_crops_csv",
    "load_crops",
    "load_points_crops",
    "read_crops_table",
    "read_rgb",
    "region_box",
    "rescale",
    "split_slides",
    "tissue_mask",
    "tissue_mm2",
    "tissue_regions",
    "tissue_sources",
]
