"""Format backends behind :func:`napari_hemato.core.slide.open_slide`.

Each ``open_*`` function turns one file (or directory) into an :class:`Opened`:
one :class:`PlaneView` per pyramid level, the physical pixel size found in the
metadata and the callables that release file handles. Third-party readers are
imported inside the functions, and every failure becomes a one-line
:class:`~napari_hemato.core.errors.SlideError` naming the file.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SlideError
from .slide_layout import MIN_CHUNK, PlaneView, fail, layout, length_to_um  # noqa: F401

log = logging.getLogger(__name__)

_ASSOCIATED = {"label", "macro", "thumbnail"}
_ZARR_META = (".zattrs", ".zgroup", ".zarray", "zarr.json")


@dataclass
class Opened:
    """What a backend found: level views (level 0 first) and pixel size."""

    views: list[PlaneView]
    mpp_xy: tuple[float, float] | None
    mpp_source: str
    backend: str
    closers: list[Callable[[], Any]] = field(default_factory=list)


def open_tiff(path: Path) -> Opened:
    """Pyramidal TIFF, OME-TIFF, SVS or plain TIFF through tifffile's zarr store."""
    import tifffile
    import zarr

    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:
        raise fail(path, f"not a readable TIFF file ({exc})") from exc
    closers: list[Callable[[], Any]] = []
    try:
        candidates = [s for s in tf.series if s.name.lower() not in _ASSOCIATED] or tf.series
        if not candidates:
            raise fail(path, "the TIFF file holds no image")
        series = max(candidates, key=lambda s: math.prod(s.shape))  # first of equals
        views: list[PlaneView] = []
        for i, level in enumerate(series.levels):
            if level.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE:
                raise fail(path, "palette-colour TIFF images are not supported")
            y, x, c = layout(path, level.shape, level.axes)
            _check_complete(path, level, tf.filehandle.size)
            store = series.aszarr(level=i)
            closers.append(store.close)
            view = PlaneView(zarr.open(store, mode="r", zarr_format=2), y, x, c)
            if views and (
                view.shape[2] != views[0].shape[2]
                or view.dtype != views[0].dtype
                or view.shape[0] > views[-1].shape[0]
            ):
                log.warning("%s: ignoring pyramid level %d %s that does not fit", path, i, level)
                break
            views.append(view)
        mpp_xy, source = _tiff_mpp(tf, tf.series.index(series), series.keyframe)
    except SlideError:
        _close_all([*closers, tf.close])
        raise
    except Exception as exc:
        _close_all([*closers, tf.close])
        raise fail(path, f"corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from exc
    return Opened(views, mpp_xy, source, "tifffile", [*closers, tf.close])


def _check_complete(path: Path, level: Any, filesize: int) -> None:
    """Refuse a truncated file: every strip or tile must lie inside the file."""
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        end = int((offsets + counts).max()) if counts.size else 0
        if end > filesize:
            raise fail(
                path,
                f"truncated file: image data ends at byte {end} but the file has {filesize} bytes",
            )


def _tiff_mpp(tf: Any, index: int, page: Any) -> tuple[tuple[float, float] | None, str]:
    if tf.is_svs:
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tf.pages[0].description or "")
        if match and float(match.group(1)) > 0:
            return (float(match.group(1)),) * 2, "svs"
    if tf.is_ome and tf.ome_metadata:
        mpp = _ome_xml_mpp(tf.ome_metadata, index)
        if mpp:
            return mpp, "ome"
    mpp = _resolution_mpp(tf, page)
    return (mpp, "tiff-resolution") if mpp else (None, "none")


def _ome_xml_mpp(xml: str, index: int) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("unreadable OME-XML metadata; pixel size unknown")
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    px = pixels[index] if index < len(pixels) else pixels[0]
    sizes = []
    for ax in "XY":
        value = px.get(f"PhysicalSize{ax}")
        sizes.append(
            length_to_um(float(value), px.get(f"PhysicalSize{ax}Unit", "µm")) if value else None
        )
    return (sizes[0], sizes[1]) if None not in sizes else None


def _resolution_mpp(tf: Any, page: Any) -> tuple[float, float] | None:
    """µm/px from XResolution/YResolution, ignoring the meaningless defaults."""
    try:
        rx, ry = (float(v) for v in page.resolution)
        unit = int(page.resolutionunit)
    except (TypeError, ValueError, AttributeError):
        return None
    if rx <= 0 or ry <= 0 or (rx, ry) == (1.0, 1.0) or (unit == 2 and (rx, ry) == (72.0, 72.0)):
        return None
    um_per_unit = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)
    if unit == 1 and tf.is_imagej:  # ImageJ keeps the unit in its description
        um_per_unit = length_to_um(1.0, (tf.imagej_metadata or {}).get("unit"))
    return (um_per_unit / rx, um_per_unit / ry) if um_per_unit else None


# -- OME-Zarr ----------------------------------------------------------------------------------


def open_zarr(path: Path) -> Opened:
    """OME-Zarr (NGFF multiscales 0.4 / 0.5), or a bare zarr array as one level."""
    import zarr

    if path.is_dir() and not any((path / m).is_file() for m in _ZARR_META):
        raise fail(path, "directory is not a Zarr store (no .zattrs, .zarray or zarr.json)")
    try:
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Array):
            return Opened([PlaneView(node, *layout(path, node.shape))], None, "none", "ome-zarr")
        attrs = node.attrs.asdict()
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise fail(path, "Zarr group without OME-NGFF 'multiscales' metadata")
        ms = multiscales[0]
        arrays = [node[d["path"]] for d in ms["datasets"]]
        axes = _ngff_axes(ms, arrays[0].ndim)
        letters = "".join(a[0] for a in axes)
        views = [PlaneView(a, *layout(path, a.shape, letters)) for a in arrays]
        scale = _ngff_scale(ms, ms["datasets"][0], arrays[0].ndim)
        mpp = [length_to_um(scale[letters.index(ax)], axes[letters.index(ax)][1]) for ax in "XY"]
    except SlideError:
        raise
    except Exception as exc:
        raise fail(path, f"not a readable OME-Zarr ({type(exc).__name__}: {exc})") from exc
    if any(v.shape[2] != views[0].shape[2] or v.dtype != views[0].dtype for v in views):
        raise fail(path, "OME-Zarr levels differ in channels or dtype")
    mpp_xy = (mpp[0], mpp[1]) if None not in mpp else None
    return Opened(views, mpp_xy, "ome-zarr" if mpp_xy else "none", "ome-zarr")


def _ngff_axes(ms: dict, ndim: int) -> list[tuple[str, str | None]]:
    """(letter, unit) per axis; NGFF < 0.3 had no axes and meant (t, c, z, y, x)."""
    axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-ndim:]
    out = []
    for ax in axes:
        name, kind, unit = (
            (ax.get("name", ""), ax.get("type"), ax.get("unit"))
            if isinstance(ax, dict)
            else (ax, None, None)
        )
        letter = {"x": "X", "y": "Y", "c": "C", "z": "Z", "t": "T"}.get(name.lower())
        letter = letter or {"channel": "C", "time": "T", "space": "Z"}.get(kind or "", "Q")
        out.append((letter, unit))
    return out


def _ngff_scale(ms: dict, dataset: dict, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for transforms in (
        dataset.get("coordinateTransformations"),
        ms.get("coordinateTransformations"),
    ):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    return scale


# -- plain images (Pillow) ---------------------------------------------------------------------


def open_image(path: Path) -> Opened:
    """PNG / JPEG / BMP: decoded into memory (a few MP) and wrapped as one level."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "PA", "LA", "La", "RGBa"):
                im = im.convert("RGBA" if mode != "P" or "transparency" in im.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if mode == "1" else "RGB")
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise fail(path, f"not a readable image ({exc})") from exc
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 1:  # PIL 'I;16*' and 'I' modes
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise fail(path, f"unsupported pixel values for {arr.dtype} (outside 0..65535)")
        arr = arr.astype(np.uint16)
    return Opened([PlaneView(arr, *layout(path, arr.shape))], None, "none", "image")


# -- OpenSlide (optional) ----------------------------------------------------------------------


class _OpenSlideLevel:
    """One OpenSlide level as a (Y, X, 3) uint8 array-like (RGBA composited on white)."""

    def __init__(self, osr: Any, level: int) -> None:
        self.osr, self.level = osr, level
        w, h = osr.level_dimensions[level]
        self.shape, self.dtype, self.ndim = (h, w, 3), np.dtype(np.uint8), 3
        tw = osr.properties.get(f"openslide.level[{level}].tile-width")
        th = osr.properties.get(f"openslide.level[{level}].tile-height")
        self.chunks = (int(th or MIN_CHUNK), int(tw or MIN_CHUNK), 3)

    def __getitem__(self, key: tuple) -> np.ndarray:
        (y0, y1, _), (x0, x1, _) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[:, :, key[2]]
        ds = self.osr.level_downsamples[self.level]
        rgba = np.asarray(
            self.osr.read_region((round(x0 * ds), round(y0 * ds)), self.level, (x1 - x0, y1 - y0)),
            dtype=np.float32,
        )
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)[:, :, key[2]]


def open_openslide(path: Path) -> Opened:
    """NDPI, MRXS, SCN, ... through OpenSlide when it is installed."""
    try:
        import openslide
    except ImportError as exc:
        raise fail(
            path, "this format needs OpenSlide: pip install napari-hemato[openslide]"
        ) from exc
    try:
        osr = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise fail(path, f"OpenSlide cannot read it ({exc})") from exc
    views = [PlaneView(_OpenSlideLevel(osr, i), 0, 1, 2) for i in range(osr.level_count)]
    props = osr.properties
    try:
        mpp_xy = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
    except (KeyError, ValueError):
        mpp_xy = None
    return Opened(views, mpp_xy, "openslide" if mpp_xy else "none", "openslide", [osr.close])


def _close_all(closers: list[Callable[[], Any]]) -> None:
    for close in closers:
        try:
            close()
        except (OSError, RuntimeError, ValueError) as exc:  # closing must not mask the cause
            log.debug("error while closing: %s", exc)
