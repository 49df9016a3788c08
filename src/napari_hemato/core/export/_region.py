"""The RGB pixels under an annotation set's label image, for formats that carry the image."""

from __future__ import annotations

import logging

import numpy as np

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.errors import SlideError
from napari_hemato.core.export._atomic import ExportError

log = logging.getLogger(__name__)


def region_rgb(ann: AnnotationSet, image=None, *, what: str) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels of level 0 under ``ann.labels`` (white outside the image).

    ``image`` (an array of the labels' shape, any dtype :func:`to_rgb8` takes)
    is used as given; otherwise the region is read from ``ann.image_path``.
    When that image cannot be opened, a warning names ``what`` is written
    without it and None is returned.
    """
    from napari_hemato.core.slide import open_slide, to_rgb8

    box = ann.box
    if box is None:
        return None
    if image is not None:
        arr = np.asarray(image)
        if arr.shape[:2] != ann.labels.shape:
            raise ExportError(f"cannot write {what}: the image is {arr.shape[:2]}, "
                              f"the labels {ann.labels.shape}")
        try:
            return to_rgb8(arr)
        except SlideError as exc:
            raise ExportError(f"cannot write {what}: {exc}") from exc
    if not ann.image_path:
        log.warning("%s: the annotations name no image; written without the image", what)
        return None
    try:
        with open_slide(ann.image_path) as slide:
            return to_rgb8(slide.read_region(0, *box, fill=255))
    except (SlideError, OSError) as exc:
        log.warning("%s: cannot read the image region (%s); written without the image", what, exc)
        return None
