"""Open whole-slide images and plain images as lazy (Y, X, C) pyramids.

:func:`open_slide` reads pyramidal TIFF / OME-TIFF / Aperio SVS (tifffile + zarr),
OME-Zarr, PNG / JPEG / BMP and, when installed, the formats only OpenSlide
reads. Pixel data is read only when asked for: through the dask ``levels`` or,
fast and without a dask graph, through :meth:`Slide.read_region`.

Examples
--------
>>> with open_slide("slide.svs") as slide:  # doctest: +SKIP
...     level = slide.best_level(1.0)
...     tile = to_rgb8(slide.read_region(level, 0, 0, 512, 512))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from . import _slide_backends as backends
from .errors import SlideError

__all__ = ["BACKENDS", "MPP_SOURCES", "Slide", "detect_backend", "open_slide", "to_rgb8"]

log = logging.getLogger(__name__)

MPP_SOURCES = ("svs", "ome", "tiff-resolution", "ome-zarr", "openslide", "user", "red-cells",
               "none")
BACKENDS = {
    "tifffile": backends.open_tiff,
    "ome-zarr": backends.open_zarr,
    "image": backends.open_image,
    "openslide": backends.open_openslide,
}
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
_MAGIC = {
    b"II*\0": "tifffile",
    b"MM\0*": "tifffile",
    b"II+\0": "tifffile",
    b"MM\0+": "tifffile",
    b"\x89PNG": "image",
    b"\xff\xd8\xff": "image",
    b"BM": "image",
}
_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")
_ANISOTROPY = 0.01


@dataclass(eq=False)
class Slide:
    """An opened slide: a lazy pyramid of (Y, X, C) dask arrays plus pixel size.

    Attributes
    ----------
    path : Path
        The file or directory opened.
    levels : list of dask.array.Array
        Pyramid levels, level 0 at full resolution, each shaped (Y, X, C) with
        C in {1, 3, 4}, backed lazily by the file.
    mpp : float or None
        Micrometres per pixel at level 0 (None when unknown).
    mpp_source : str
        Where ``mpp`` came from: one of :data:`MPP_SOURCES`.
    backend : str
        ``"tifffile"``, ``"ome-zarr"``, ``"openslide"`` or ``"image"``.

    Examples
    --------
    >>> slide = open_slide("slide.svs")  # doctest: +SKIP
    >>> slide.shape, slide.mpp, slide.downsamples  # doctest: +SKIP
    ((2967, 2220), 0.499, [1.0])
    """

    path: Path
    levels: list[da.Array]
    mpp: float | None
    mpp_source: str
    backend: str
    _views: list[backends.PlaneView] = field(default_factory=list, repr=False, compare=False)
    _closers: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (Y, X) size in pixels."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def dtype(self) -> np.dtype:
        """Pixel data type (the same on every level)."""
        return np.dtype(self.levels[0].dtype)

    @property
    def n_channels(self) -> int:
        """Number of channels C: 1 (greyscale), 3 (RGB) or 4 (RGBA)."""
        return int(self.levels[0].shape[2])

    @property
    def downsamples(self) -> list[float]:
        """Level-0 size / level size per level (mean of Y and X; 1.0 first)."""
        y0, x0 = self.shape
        return [1.0] + [(y0 / lv.shape[0] + x0 / lv.shape[1]) / 2 for lv in self.levels[1:]]

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel at ``level`` (None when the pixel size is unknown).

        Examples
        --------
        >>> slide.level_mpp(0)  # doctest: +SKIP
        0.499
        """
        return None if self.mpp is None else self.mpp * self.downsamples[level]

    def best_level(self, target_mpp: float, *, tolerance: float = 0.05) -> int:
        """The coarsest level whose mpp is <= ``target_mpp * (1 + tolerance)``.

        Level 0 when the pixel size is unknown or every level is coarser.

        Examples
        --------
        >>> slide.best_level(2.0)  # doctest: +SKIP
        2
        """
        if self.mpp is None:
            return 0
        limit = target_mpp * (1 + tolerance)
        fine_enough = [i for i in range(len(self.levels)) if self.level_mpp(i) <= limit]
        return max(fine_enough, key=lambda i: self.downsamples[i]) if fine_enough else 0

    def read_region(
        self, level: int, y0: int, x0: int, y1: int, x1: int, *, fill: int = 255
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` as a (y1-y0, x1-x0, C) array.

        Reads straight from the backing store (no dask graph); the dtype is the
        slide's own. Any part outside the level is set to ``fill``, given on the
        uint8 scale so that 255 is white for every dtype: it is stored as
        ``fill * 257`` for uint16 and ``fill / 255`` for float slides.

        Examples
        --------
        >>> slide.read_region(0, -10, -10, 246, 246).shape  # doctest: +SKIP
        (256, 256, 3)
        """
        if not 0 <= level < len(self.levels):
            raise SlideError(f"{self.path}: no pyramid level {level} ({len(self.levels)} levels)")
        if y1 < y0 or x1 < x0:
            raise SlideError(f"{self.path}: empty region y {y0}:{y1}, x {x0}:{x1}")
        h, w, c = self.levels[level].shape
        out = np.full((y1 - y0, x1 - x0, c), _native_fill(fill, self.dtype), dtype=self.dtype)
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if ya >= yb or xa >= xb:
            return out
        try:
            if self._views:
                part = self._views[level].read(ya, yb, xa, xb)
            else:  # a Slide built by hand from dask arrays
                part = np.asarray(self.levels[level][ya:yb, xa:xb].compute())
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read level {level} y {ya}:{yb} x {xa}:{xb} "
                f"({type(exc).__name__}: {exc})".replace("\n", " ")
            ) from exc
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = part
        return out

    def info(self) -> dict:
        """A JSON-serialisable summary: path, backend, levels, dtype, channels, mpp.

        Examples
        --------
        >>> slide.info()["levels"][0]  # doctest: +SKIP
        {'shape': [2967, 2220, 3], 'downsample': 1.0, 'mpp': 0.499}
        """
        return {
            "path": str(self.path),
            "backend": self.backend,
            "levels": [
                {
                    "shape": [int(s) for s in lv.shape],
                    "downsample": float(ds),
                    "mpp": self.level_mpp(i),
                }
                for i, (lv, ds) in enumerate(zip(self.levels, self.downsamples, strict=True))
            ],
            "dtype": str(self.dtype),
            "channels": self.n_channels,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
        }

    def close(self) -> None:
        """Release file handles; the dask levels become unusable."""
        backends._close_all(self._closers)
        self._closers = []

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def detect_backend(path: Path) -> str:
    """The backend :func:`open_slide` picks for ``path`` (by extension, then magic bytes).

    Examples
    --------
    >>> detect_backend(Path("slide.svs"))
    'tifffile'
    """
    name = path.name.lower()
    if path.is_dir() or name.endswith(".zarr"):
        return "ome-zarr"
    for suffixes, backend in (
        (TIFF_SUFFIXES, "tifffile"),
        (IMAGE_SUFFIXES, "image"),
        (OPENSLIDE_SUFFIXES, "openslide"),
    ):
        if name.endswith(suffixes):
            return backend
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise backends.fail(path, f"cannot read the file ({exc})") from exc
    for magic, backend in _MAGIC.items():
        if head.startswith(magic):
            return backend
    raise backends.fail(path, f"unknown image format (extension {path.suffix or 'none'!r})")


def open_slide(path: str | Path, *, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open a slide or image lazily as a (Y, X, C) pyramid.

    Parameters
    ----------
    path : str or Path
        SVS, (OME-)TIFF, OME-Zarr directory, PNG / JPEG / BMP, or a format
        OpenSlide reads (NDPI, MRXS, SCN, ...) when it is installed.
    mpp : float, optional
        Micrometres per pixel at level 0; overrides the metadata
        (``mpp_source="user"``).
    backend : str, optional
        Force ``"tifffile"``, ``"ome-zarr"``, ``"image"`` or ``"openslide"``;
        None picks one from the extension or the file's first bytes.

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        Missing, empty, truncated or corrupt file, unknown format, zero-sized
        image, unsupported dtype or channel layout, anisotropic pixels.

    Examples
    --------
    >>> slide = open_slide("smear.jpg", mpp=0.25)  # doctest: +SKIP
    >>> slide.mpp_source  # doctest: +SKIP
    'user'
    """
    path = Path(path).expanduser()
    if mpp is not None:
        try:
            ok = math.isfinite(float(mpp)) and float(mpp) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise SlideError(f"cannot open {path}: mpp must be a positive number, got {mpp!r}")
    if not path.exists():
        raise backends.fail(path, "no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise backends.fail(path, "empty file (0 bytes)")
    backend = backend or detect_backend(path)
    if backend not in BACKENDS:
        raise backends.fail(path, f"unknown backend {backend!r} (choose from {sorted(BACKENDS)})")
    opened = BACKENDS[backend](path)
    try:
        dtype = opened.views[0].dtype
        if dtype.name not in _DTYPES:
            raise backends.fail(
                path, f"unsupported pixel type {dtype} (need uint8, uint16 or float)"
            )
        slide_mpp, source = _pixel_size(path, opened, mpp)
        stat = path.stat()
        token = tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, backend)
        levels = [v.to_dask(name=f"hemato-slide-{token}-{i}") for i, v in enumerate(opened.views)]
    except Exception:
        backends._close_all(opened.closers)
        raise
    slide = Slide(path, levels, slide_mpp, source, opened.backend, opened.views, opened.closers)
    log.info(
        "opened %s with %s: %d level(s), %s, mpp %s (%s)",
        path,
        slide.backend,
        len(levels),
        [tuple(lv.shape) for lv in levels],
        slide_mpp,
        source,
    )
    return slide


def _pixel_size(
    path: Path, opened: backends.Opened, user: float | None
) -> tuple[float | None, str]:
    if user is not None:
        return float(user), "user"
    if opened.mpp_xy is None:
        return None, "none"
    mx, my = opened.mpp_xy
    if abs(mx - my) > _ANISOTROPY * max(mx, my):
        raise backends.fail(
            path,
            f"anisotropic pixels ({mx:.4g} x {my:.4g} µm) are not supported; pass mpp= to override",
        )
    return (mx + my) / 2, opened.mpp_source


def _native_fill(fill: int, dtype: np.dtype) -> float:
    """``fill`` on the uint8 scale (255 = white) as a value of ``dtype``."""
    if dtype.kind == "f":
        return fill / 255.0
    return min(max(int(fill), 0), 255) * (257 if dtype == np.uint16 else 1)


def to_rgb8(region: np.ndarray) -> np.ndarray:
    """Any region from :meth:`Slide.read_region` as (h, w, 3) uint8 RGB.

    Greyscale is replicated, RGBA is composited on white, uint16 is divided
    by 257 and floats in [0, 1] are scaled by 255.

    Examples
    --------
    >>> to_rgb8(np.full((2, 2, 1), 65535, np.uint16))[0, 0]
    array([255, 255, 255], dtype=uint8)
    """
    region = np.asarray(region)
    if region.ndim == 2:
        region = region[..., None]
    if region.ndim != 3 or region.shape[2] not in (1, 3, 4):
        raise SlideError(f"cannot convert a region of shape {region.shape} to RGB")
    kind = region.dtype
    if kind == np.uint8:
        scaled = region.astype(np.float32) if region.shape[2] == 4 else region
    elif kind == np.uint16:
        scaled = region.astype(np.float32) / 257.0
    elif kind.kind == "f":
        if region.size and not (np.nanmin(region) >= 0.0 and np.nanmax(region) <= 1.0):
            raise SlideError(f"cannot convert a {kind} region with values outside [0, 1] to RGB")
        scaled = np.nan_to_num(region.astype(np.float32)) * 255.0
    else:
        raise SlideError(f"cannot convert a region of dtype {kind} to RGB")
    if scaled.shape[2] == 4:
        alpha = scaled[..., 3:] / 255.0
        scaled = scaled[..., :3] * alpha + 255.0 * (1.0 - alpha)
    elif scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    if scaled.dtype == np.uint8:
        return np.ascontiguousarray(scaled)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def slide_from_array(array, *, mpp: float | None = None, name: str = "<array>") -> Slide:
    """Wrap an in-memory (Y, X) or (Y, X, C) array (numpy or dask) as a one-level slide.

    Used for napari image layers that do not come from a file.

    Examples
    --------
    >>> slide = slide_from_array(np.zeros((64, 64, 3), np.uint8), mpp=0.5)
    >>> slide.shape, slide.mpp_source
    ((64, 64), 'user')
    """
    arr = array
    if arr.ndim == 2:
        view = backends.PlaneView(arr, 0, 1, None)
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        view = backends.PlaneView(arr, 0, 1, 2)
    else:
        raise SlideError(f"cannot use {name}: need (Y, X) or (Y, X, C) with C in 1, 3, 4; got {arr.shape}")
    if np.dtype(arr.dtype).name not in _DTYPES:
        raise SlideError(f"cannot use {name}: unsupported pixel type {arr.dtype}")
    if 0 in arr.shape:
        raise SlideError(f"cannot use {name}: zero-sized image {arr.shape}")
    level = view.to_dask(name=f"hemato-array-{tokenize(name, id(arr))}")
    return Slide(Path(name), [level], None if mpp is None else float(mpp),
                 "user" if mpp else "none", "array", [view], [])
