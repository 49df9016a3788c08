"""Tissue masks in and out: a run's ``tissue=`` choice, mask files, the result store's copy.

:func:`resolve_tissue` turns what a caller passes as ``tissue=`` into a
:class:`~napari_hemato.core.tissue.TissueMask` or None:

- ``"auto"``: detected on the slide by ``detect`` (default H&E tissue,
  :func:`~napari_hemato.core.tissue.detect_tissue`; a smear's reading zone,
  :func:`~napari_hemato.core.reading_zone.detect_reading_zone`, comes from its task);
  resuming a run, the mask (or no mask) that run used;
- ``"none"`` / None: no mask, every tile is read;
- a path: a PNG / TIFF binary mask of the whole slide at any resolution (non-zero =
  tissue), scaled to the slide; or a GeoJSON of polygons in level-0 pixels (``[x, y]``,
  as our exports and QuPath write them);
- a :class:`TissueMask`, or a 2-D boolean array covering the whole slide (as a mask file).

A bad mask file raises :class:`TissueError` with a one-line message naming it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.core.tissue import ASSUMED_MPP0, MASK_MPP, TissueMask, detect_tissue

log = logging.getLogger(__name__)

MASK_FILE = "tissue.npz"  #: the mask inside a result store
MAX_MASK_SIDE = 8192  #: larger mask files are reduced (any-pooling) to at most this
_ASPECT = 0.02  #: a mask file's aspect ratio may differ from the slide's by this much
CHOICES = ("auto", "none")


class TissueError(HematoError, ValueError):
    """A tissue mask (file or array) cannot be used for a slide."""


def resolve_tissue(slide, tissue, *, roi=None, stored: TissueMask | None | bool = False,
                   detect=None) -> TissueMask | None:
    """The mask a run over ``slide`` (in level-0 ``roi``) uses for ``tissue`` (see the
    module docstring).

    ``stored`` is the mask of the run being resumed (None: it had none; False: no run
    to resume): ``"auto"`` then takes it as it is instead of detecting again. ``detect``:
    ``detect(slide, roi=roi) -> TissueMask | None`` for ``"auto"`` (default
    :func:`~napari_hemato.core.tissue.detect_tissue`).
    """
    if tissue is None or (isinstance(tissue, str) and tissue == "none"):
        return None
    if isinstance(tissue, str) and tissue == "auto":
        if stored is not False:
            return stored
        return (detect or detect_tissue)(slide, roi=roi)
    if isinstance(tissue, TissueMask):
        return tissue
    if isinstance(tissue, np.ndarray):
        if tissue.ndim != 2 or 0 in tissue.shape:
            raise TissueError(f"a tissue mask array must be 2-D and non-empty, got {tissue.shape}")
        _check_aspect(tissue.shape, slide.shape, "the tissue mask array")
        return TissueMask.from_array(tissue != 0, slide.shape, mpp0=slide.mpp, source="array")
    if isinstance(tissue, (str, os.PathLike)):
        return load_mask_file(tissue, slide)
    raise TissueError(f"tissue must be 'auto', 'none', a mask file, a TissueMask or a 2-D array "
                      f"(got {type(tissue).__name__})")


def load_mask_file(path, slide) -> TissueMask:
    """A PNG / TIFF binary mask or a GeoJSON of polygons, as a mask of ``slide``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TissueError(f"tissue mask {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        return _from_geojson(path, slide)
    if suffix not in (".png", ".tif", ".tiff"):
        raise TissueError(f"tissue mask {path}: unknown format {suffix or 'none'!r} "
                          "(use a PNG or TIFF binary mask, or a GeoJSON of polygons)")
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L") if im.mode not in ("1", "L", "I", "I;16") else im)
        else:
            import tifffile

            arr = tifffile.imread(path, key=0)
    except Exception as err:  # noqa: BLE001 - PIL and tifffile raise many kinds on bad files
        raise TissueError(f"tissue mask {path}: cannot read it ({type(err).__name__}: "
                          f"{err})".replace("\n", " ")) from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] > 1 else arr[..., 0]
    if arr.ndim != 2 or 0 in arr.shape:
        raise TissueError(f"tissue mask {path}: need a 2-D binary image, got shape {arr.shape}")
    values = np.unique(arr[:: max(1, arr.shape[0] // 512), :: max(1, arr.shape[1] // 512)])
    if values.size > 2:
        raise TissueError(f"tissue mask {path}: not a binary mask ({values.size} distinct values; "
                          "need 0 for glass and one other value for tissue)")
    _check_aspect(arr.shape, slide.shape, f"tissue mask {path}")
    mask = _reduce(arr != 0)
    return TissueMask.from_array(mask, slide.shape, mpp0=slide.mpp, source=f"file:{path}")


def _check_aspect(mask_shape, slide_shape, what: str) -> None:
    (h, w), (h0, w0) = mask_shape[:2], slide_shape
    if abs((h / w) / (h0 / w0) - 1.0) > _ASPECT:
        raise TissueError(f"{what} is {h}×{w} px, its aspect differs from the slide's "
                          f"{h0}×{w0} px: it must cover the whole slide")


def _reduce(mask: np.ndarray) -> np.ndarray:
    """Any-pool a large mask to at most :data:`MAX_MASK_SIDE` px a side."""
    f = math.ceil(max(mask.shape) / MAX_MASK_SIDE)
    if f <= 1:
        return mask
    h, w = math.ceil(mask.shape[0] / f), math.ceil(mask.shape[1] / f)
    padded = np.zeros((h * f, w * f), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(h, f, w, f).any(axis=(1, 3))


def _from_geojson(path: Path, slide) -> TissueMask:
    from napari_hemato.core.export.geojson import rasterize

    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TissueError(f"tissue mask {path}: not valid JSON ({err})") from None
    try:
        polygons = list(_polygons(doc))
    except (KeyError, TypeError, ValueError) as err:
        raise TissueError(f"tissue mask {path}: not a GeoJSON of polygons ({err})") from None
    if not polygons:
        raise TissueError(f"tissue mask {path}: holds no Polygon or MultiPolygon")
    h0, w0 = slide.shape
    step = MASK_MPP / (slide.mpp or ASSUMED_MPP0)  # level-0 px per mask px
    h, w = max(1, math.ceil(h0 / step)), max(1, math.ceil(w0 / step))
    sy, sx = h0 / h, w0 / w
    mask = np.zeros((h, w), bool)
    for rings in polygons:  # each polygon by the even-odd rule: its holes stay out
        scaled = [np.asarray(r, np.float64).reshape(-1, 2)[:, :2] / (sx, sy) for r in rings]
        mask |= rasterize(scaled, (0, 0, h, w))
    return TissueMask(mask, (sy, sx), slide.mpp, f"file:{path}")


def _polygons(doc):
    """Each polygon of a GeoJSON document as its list of rings."""
    kind = doc["type"]
    if kind == "FeatureCollection":
        for feature in doc["features"]:
            yield from _polygons(feature)
    elif kind == "Feature":
        if doc.get("geometry"):
            yield from _polygons(doc["geometry"])
    elif kind == "GeometryCollection":
        for geom in doc["geometries"]:
            yield from _polygons(geom)
    elif kind == "Polygon":
        yield doc["coordinates"]
    elif kind == "MultiPolygon":
        yield from doc["coordinates"]


# -- in the result store ----------------------------------------------------------------------------
def mask_bytes(tissue: TissueMask) -> bytes:
    """``tissue`` as the bytes of the store's ``tissue.npz``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, mask=np.packbits(tissue.mask, axis=None),
                        shape=np.asarray(tissue.shape, np.int64),
                        scale=np.asarray(tissue.scale, np.float64),
                        mpp0=np.asarray(np.nan if tissue.mpp0 is None else tissue.mpp0),
                        source=np.asarray(tissue.source))
    return buf.getvalue()


def read_mask(path: Path) -> TissueMask:
    """The mask saved by :func:`mask_bytes` at ``path``."""
    from napari_hemato.core.errors import StoreError

    try:
        with np.load(path, allow_pickle=False) as data:
            h, w = (int(v) for v in data["shape"])
            mask = np.unpackbits(data["mask"], count=h * w).reshape(h, w).astype(bool)
            mpp0 = float(data["mpp0"])
            return TissueMask(mask, tuple(data["scale"].tolist()),
                              None if math.isnan(mpp0) else mpp0, str(data["source"]))
    except (OSError, ValueError, KeyError) as err:
        raise StoreError(f"{path}: unreadable tissue mask ({err})") from None
