"""One fix to napari, applied when the level of detail needs it (napari objects, no Qt).

napari documents ``Points.shown`` as "whether each point is shown", but its slice request
(``napari.layers.points._slice._PointSliceRequest.__call__``, napari 0.5–0.9) returns every
index when no dimension is sliced away: in 2D, ``shown`` is ignored and all points are
uploaded and drawn. :func:`respect_points_shown` wraps that call so that, in that case only,
the hidden points are left out (the indices and sizes the request would give with a third
dimension). Nothing changes when every point is shown or when a dimension is sliced.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

log = logging.getLogger(__name__)
_PATCHED = "_napari_hemato_respects_shown"


def respect_points_shown() -> bool:
    """Make 2D Points slicing honour ``shown``; idempotent. False when napari's slice request
    does not have the expected shape (then the level of detail only affects what is kept)."""
    try:
        from napari.layers.points import _slice
    except ImportError:  # pragma: no cover - napari without the module
        return False
    request = getattr(_slice, "_PointSliceRequest", None)
    fields = getattr(request, "__dataclass_fields__", {})
    if request is None or not {"shown", "size", "data", "slice_input"} <= set(fields):
        log.warning("napari's points slicing changed; the level of detail cannot hide points")
        return False
    if getattr(request.__call__, _PATCHED, False):
        return True
    original = request.__call__

    def __call__(self):
        response = original(self)
        shown = np.asarray(self.shown, bool)
        if list(self.slice_input.not_displayed) or len(shown) != len(response.indices) or shown.all():
            return response
        keep = np.flatnonzero(shown)
        size = np.broadcast_to(np.asarray(self.size), (len(shown),))[keep]
        return dataclasses.replace(response, indices=keep, size=size)

    setattr(__call__, _PATCHED, True)
    request.__call__ = __call__
    return True
