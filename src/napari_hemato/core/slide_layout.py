"""Axes of an image file: which are Y, X and colour, how big a pixel is (no file access).

:func:`layout` turns a file's shape (and its axis letters, when the format names
them) into a :class:`PlaneView` of one 2-D RGB-like plane, or a one-line
:class:`~napari_hemato.core.errors.SlideError` saying why it is not one (a
z-stack, two channel axes, an unsupported channel count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .errors import SlideError

MIN_CHUNK = 512  # dask chunks are whole multiples of the file's tiles, >= this many px a side
_STACK_LETTERS_UNKNOWN = set("QI")  # tifffile's "generic" axes: layout decided from the shape
_UM_PER = {  # length unit (lower case) -> micrometres
    name: factor
    for names, factor in (
        ("µm μm um micron microns micrometer micrometre \\u00b5m", 1.0),
        ("nm nanometer nanometre", 1e-3),
        ("mm millimeter millimetre", 1e3),
        ("cm centimeter centimetre", 1e4),
        ("m meter metre", 1e6),
        ("å angstrom", 1e-4),
        ("pm picometer picometre", 1e-6),
    )
    for name in names.split()
}



def fail(path: Path, problem: str) -> SlideError:
    """A :class:`SlideError` with a one-line message naming ``path`` and the problem."""
    return SlideError(" ".join(f"cannot open {path}: {problem}".split()))


@dataclass
class PlaneView:
    """A (Y, X, C) window onto an N-D array: other axes fixed at 0, channels last.

    ``array`` is anything with ``shape``, ``dtype`` and numpy basic indexing
    (a zarr array, a numpy array, an OpenSlide level); ``c=None`` adds C = 1.
    """

    def __init__(self, array: Any, y: int, x: int, c: int | None) -> None:
        self.array, self.y, self.x, self.c = array, y, x, c
        self.shape = (array.shape[y], array.shape[x], 1 if c is None else array.shape[c])
        self.dtype = np.dtype(array.dtype)
        kept = sorted(a for a in (y, x, c) if a is not None)
        self._perm = [kept.index(a) for a in (y, x, c) if a is not None]

    def _index(self, ys: slice, xs: slice) -> tuple:
        sel: list[Any] = [0] * self.array.ndim
        sel[self.y], sel[self.x] = ys, xs
        if self.c is not None:
            sel[self.c] = slice(None)
        return tuple(sel)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (inside the level) as a (h, w, C) numpy array."""
        out = np.asarray(self.array[self._index(slice(y0, y1), slice(x0, x1))])
        out = out.transpose(self._perm)
        return out if self.c is not None else out[..., None]

    def tile(self) -> tuple[int, int]:
        """The storage chunk (tile or strip) size along Y and X."""
        chunks = getattr(self.array, "chunks", None)
        if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
            return int(chunks[self.y]), int(chunks[self.x])
        return MIN_CHUNK, MIN_CHUNK

    def to_dask(self, name: str) -> da.Array:
        """A lazy dask array of the level, shaped (Y, X, C), chunked on whole tiles."""
        (ty, tx), shape = self.tile(), self.array.shape
        chunks = [1] * self.array.ndim
        chunks[self.y] = min(shape[self.y], ty * max(1, math.ceil(MIN_CHUNK / ty)))
        chunks[self.x] = min(shape[self.x], tx * max(1, math.ceil(MIN_CHUNK / tx)))
        if self.c is not None:
            chunks[self.c] = shape[self.c]
        arr = da.from_array(self.array, chunks=tuple(chunks), name=name, inline_array=True)
        arr = arr[self._index(slice(None), slice(None))].transpose(self._perm)
        return arr if self.c is not None else arr[..., None]


def layout(
    path: Path, shape: tuple[int, ...], axes: str | None = None
) -> tuple[int, int, int | None]:
    """Indices of the (Y, X, C) axes in ``shape``; other axes must have size 1.

    ``axes`` are letters as tifffile spells them (Y, X, S/C channels, Z, T, ...);
    without them, or with tifffile's generic Q/I, the layout is guessed from the
    shape: (Y, X), (Y, X, C) when the last size is <= 4, else (C, Y, X).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or 0 in shape:
        raise fail(path, f"zero-sized or not a 2-D image (shape {shape})")
    big = [i for i, s in enumerate(shape) if s > 1]
    letters = axes.upper() if axes and len(axes) == len(shape) else None
    if (
        letters
        and "Y" in letters
        and "X" in letters
        and not any(letters[i] in _STACK_LETTERS_UNKNOWN for i in big)
    ):
        y, x = letters.index("Y"), letters.index("X")
        rest = [i for i in big if i not in (y, x)]
        stack = [i for i in rest if letters[i] not in "CS"]
    else:  # (..., Y, X, C) when the last size is <= 4, else (..., C, Y, X) or (..., Y, X)
        cand = big if len(big) >= 2 else list(range(len(shape)))[-2:]
        if len(cand) >= 3 and shape[cand[-1]] <= 4:
            y, x, channel = cand[-3], cand[-2], [cand[-1]]
        elif len(cand) >= 3 and shape[cand[-3]] <= 4:
            y, x, channel = cand[-2], cand[-1], [cand[-3]]
        else:
            y, x, channel = cand[-2], cand[-1], []
        stack = [i for i in cand if i not in (y, x, *channel)]
        rest = channel + stack
    what = f"axes {axes}, " if axes else ""
    if stack:  # planes: the image count, whatever the channels
        raise fail(
            path,
            f"a stack of {math.prod(shape[i] for i in stack)} planes ({what}shape "
            f"{shape}) is not supported; need one 2-D image with 1, 3 or 4 channels",
        )
    if len(rest) > 1:
        raise fail(path, f"{len(rest)} channel axes ({what}shape {shape}) are not supported; "
                         "need one 2-D image with 1, 3 or 4 channels")
    c = rest[0] if rest else None
    if c is not None and shape[c] not in (1, 3, 4):
        raise fail(path, f"unsupported channel layout: {shape[c]} channels (need 1, 3 or 4)")
    return y, x, c


def length_to_um(value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` as micrometres (``None`` when the unit is unknown)."""
    factor = _UM_PER.get((unit or "").strip().lower())
    return None if factor is None or not value or value <= 0 else float(value) * factor


# -- TIFF (tifffile + zarr) --------------------------------------------------------------------
