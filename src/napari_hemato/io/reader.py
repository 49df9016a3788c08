"""npe2 reader: slides and images as (multiscale) napari image layers in µm.

The getter claims files by extension and directories that are OME-Zarr
multiscales; the reader opens them lazily with
:func:`napari_hemato.core.slide.open_slide`. No napari or Qt import is needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.slide import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, Slide, open_slide

__all__ = ["napari_get_reader", "read_slide", "slide_to_layer_data"]

log = logging.getLogger(__name__)

CLAIMED_SUFFIXES = TIFF_SUFFIXES + IMAGE_SUFFIXES + OPENSLIDE_SUFFIXES
LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_slide` if napari-hemato can open ``path``, else None.

    Never raises: a path it does not claim (wrong extension, missing, several
    paths, a directory that is not OME-Zarr) gives None.

    Parameters
    ----------
    path : str or list of str
        One path, or a list holding exactly one path.

    Returns
    -------
    callable or None

    Examples
    --------
    >>> napari_get_reader("table.csv") is None
    True
    """
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(path)
        if p.is_dir():
            return read_slide if _is_ome_zarr(p) else None
        if p.is_file() and p.name.lower().endswith(CLAIMED_SUFFIXES):
            return read_slide
    except (OSError, TypeError, ValueError) as exc:
        log.debug("not claiming %r: %s", path, exc)
    return None


def read_slide(path: str | Sequence[str]) -> list[LayerData]:
    """Open ``path`` as an image layer, plus any corrections autosaved beside it.

    Raises :class:`~napari_hemato.core.errors.SlideError` when the file is
    claimed but cannot be opened; napari shows the message.

    Examples
    --------
    >>> [(data, kwargs, kind)] = read_slide("slide.svs")  # doctest: +SKIP
    >>> kwargs["scale"], kwargs["rgb"]  # doctest: +SKIP
    ((0.499, 0.499), True)
    """
    from napari_hemato.io.point_lod import thin_on_open
    from napari_hemato.io.viewer import restore_saved_layers

    if isinstance(path, list | tuple):
        path = path[0]
    image = slide_to_layer_data(open_slide(path))
    return thin_on_open([image, *restore_saved_layers(path, image_mpp=_image_mpp(image))])


def _image_mpp(layer_data: LayerData) -> float | None:
    """The µm/px an image layer from :func:`slide_to_layer_data` is placed at (None: pixels)."""
    kwargs = layer_data[1]
    return float(kwargs["scale"][0]) if "units" in kwargs else None


def slide_to_layer_data(slide: Slide) -> LayerData:
    """A :class:`Slide` as napari image layer data with ``scale`` in µm.

    Greyscale (C = 1) drops the channel axis; 3 or 4 channels give ``rgb=True``;
    several levels give a multiscale layer. The layer keeps the slide open.

    Examples
    --------
    >>> data, kwargs, kind = slide_to_layer_data(open_slide("x.png"))  # doctest: +SKIP
    >>> kwargs["multiscale"], kwargs["scale"]  # doctest: +SKIP
    (False, (1.0, 1.0))
    """
    rgb = slide.n_channels in (3, 4)
    levels = slide.levels if rgb else [level[..., 0] for level in slide.levels]
    multiscale = len(levels) > 1
    kwargs: dict[str, Any] = {
        "name": _layer_name(slide.path),
        "rgb": rgb,
        "multiscale": multiscale,
        "scale": (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0),
        "metadata": {"napari_hemato": slide.info()},
    }
    if slide.mpp:
        kwargs["units"] = ("um", "um")
    return (levels if multiscale else levels[0], kwargs, "image")


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".ome.btf"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_ome_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr v2 or v3 group with (OME-)NGFF multiscales."""
    for meta_name in (".zattrs", "zarr.json"):
        meta = path / meta_name
        if not meta.is_file():
            continue
        attrs = json.loads(meta.read_text(encoding="utf-8"))
        if meta_name == "zarr.json":
            attrs = attrs.get("attributes", {}) if isinstance(attrs, dict) else {}
        if isinstance(attrs, dict) and (
            "multiscales" in attrs or "multiscales" in (attrs.get("ome") or {})
        ):
            return True
    return False


def _sample(name: str, mpp: float | None = None) -> list[tuple]:
    """A bundled sample, with the corrections saved for it (in the user cache)."""
    from napari_hemato.io.point_lod import thin_on_open
    from napari_hemato.io.viewer import restore_saved_layers
    from napari_hemato.samples import sample_path

    path = sample_path(name)
    image = slide_to_layer_data(open_slide(path, mpp=mpp))
    return thin_on_open([image, *restore_saved_layers(path, image_mpp=_image_mpp(image))])


def sample_he_slide() -> list[tuple]:
    """npe2 sample: Aperio SVS H&E region, 0.499 µm/px (OpenSlide CMU-1-Small-Region, CC0)."""
    return _sample("he_slide")


def sample_smear_field() -> list[tuple]:
    """npe2 sample: peripheral blood smear field (cbc sample, MIT-style licence); no pixel size."""
    return _sample("smear_field")
