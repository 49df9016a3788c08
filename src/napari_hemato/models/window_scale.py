"""How large a cell's window is: by the cell's own size, or at a physical pixel size.

A classifier spec's ``preprocess`` chooses (:class:`WindowScale`):

- ``"scale": "self"`` (default; every model without a ``scale`` key): window
  side = cell diameter x ``context``. Magnification-free, but the absolute size
  of the cell is lost (a lymphocyte and a monocyte fill their windows alike).
- ``"scale": "red-cell"``: window side = ``window_um`` / µm per px, so every
  window covers the same physical field and a monocyte looks larger than a
  lymphocyte. The pixel size comes from, in order: (a) the caller (the smear
  pipeline knows the field's µm/px from :mod:`napari_hemato.core.smear_scale`);
  (b) the red-cell ruler (:mod:`napari_hemato.models.red_cell_ruler`) on the crop
  or the cell's neighbourhood, red cell = ``rbc_um``; (c) when the ruler fails,
  the cell's own size (diameter x ``context``), logged and counted in
  :attr:`WindowScale.sources`.

Runtime and training cut windows through these sides and
:func:`napari_hemato.models.cell_windows.normalize_cell`.

Examples
--------
>>> ws = WindowScale.from_preprocess({"scale": "red-cell", "window_um": 25.0, "context": 1.8})
>>> float(ws.sides([(None, 80.0)], mpp=0.25)[0])
100.0
>>> float(WindowScale.from_preprocess({"context": 1.5}).sides([(None, 80.0)])[0])
120.0
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from napari_hemato.models.red_cell_ruler import RBC_UM, estimate_red_cell_diameter

log = logging.getLogger(__name__)

SCALE_MODES = ("self", "red-cell")
#: a field up to this many pixels is measured once for all its cells, larger ones per cell
WHOLE_FIELD_PX = 1280 * 1024
#: per-cell neighbourhood measured by the ruler in large images (x cell diameter)
NEIGHBOURHOOD = 6.0
#: a folder's single-cell images of one size come from one device at one pixel size: read
#: this many with the ruler (:meth:`WindowScale.pooled_reading`) instead of every one ...
POOL_SAMPLE = 24
#: ... and take their median when at least this many readings succeed ...
POOL_MIN_OK = 12
#: ... and their quartile spread ((q75 - q25) / median) is at most this (one PBC folder's
#: per-image readings: 0.08-0.10; two magnifications 1.5x apart in one sample spread wider)
POOL_SPREAD = 0.2


@dataclass(frozen=True)
class PooledReading:
    """One pixel size for many crops (:meth:`WindowScale.pooled_reading`); ``mpp`` None when
    too few readings succeeded or they disagree."""

    mpp: float | None
    n_read: int
    n_ok: int
    spread: float

    @property
    def ok(self) -> bool:
        return self.mpp is not None


@dataclass
class WindowScale:
    """The window-size policy of a classifier (see the module docstring)."""

    mode: str = "self"
    context: float = 1.5
    window_um: float | None = None
    rbc_um: float = RBC_UM
    sources: Counter = field(default_factory=Counter)  # where each side came from, cumulative

    @classmethod
    def from_preprocess(cls, preprocess: dict, *, default_context: float = 1.5) -> WindowScale:
        """The policy a spec's ``preprocess`` dict records (no ``scale`` key: ``"self"``)."""
        mode = preprocess.get("scale", "self")
        if mode not in SCALE_MODES:
            raise ValueError(f"unknown preprocess scale {mode!r} (known: {', '.join(SCALE_MODES)})")
        ws = cls(mode, float(preprocess.get("context", default_context)),
                 preprocess.get("window_um"), float(preprocess.get("rbc_um", RBC_UM)))
        if mode == "red-cell" and not ws.window_um:
            raise ValueError("preprocess scale 'red-cell' needs 'window_um'")
        return ws

    def as_preprocess(self) -> dict:
        """The spec keys of this policy."""
        if self.mode == "self":
            return {"context": self.context}
        return {"context": self.context, "scale": self.mode, "window_um": self.window_um,
                "rbc_um": self.rbc_um}

    def side_from_mpp(self, mpp: float) -> float:
        """Window side (px) at ``mpp`` µm/px (red-cell mode)."""
        return float(self.window_um) / float(mpp)

    def ruler_mpp(self, image: np.ndarray, exclude=None, *, cell_px: float | None = None) -> float | None:
        """µm/px of ``image`` from its red cells, None when the ruler fails (``cell_px``: the
        diameter of the cell it is centred on, which sets the working resolution)."""
        return estimate_red_cell_diameter(image, exclude=exclude, cell_px=cell_px).mpp(self.rbc_um)

    def sides(self, cells, *, mpp=None, source: str = "caller") -> np.ndarray:
        """Window sides (px) of ``cells``, a sequence of ``(crop_or_None, diameter_px)``.

        Parameters
        ----------
        cells : sequence of (array or None, float)
            Per cell: its single-cell crop or neighbourhood, centred on the cell
            (measured by the ruler when no ``mpp`` is known), or None; and its
            diameter in px.
        mpp : float or sequence of float, optional
            Known µm/px (one for all, or one per cell; None / nan entries unknown).
        source : str
            What a known ``mpp`` is counted as in :attr:`sources`.

        Returns
        -------
        (n,) float array
        """
        n = len(cells)
        known = known_mpp(mpp, n)
        out = np.empty(n, float)
        todo = [] if self.mode == "self" else [
            i for i, (crop, _d) in enumerate(cells) if crop is not None and not (np.isfinite(known[i]) and known[i] > 0)]
        measured = dict(zip(todo, self.crop_readings([cells[i] for i in todo]), strict=True))
        for i, (_crop, d) in enumerate(cells):
            if self.mode == "self":
                out[i] = float(d) * self.context
                self.sources["self"] += 1
                continue
            m, src = known[i], source
            if not (np.isfinite(m) and m > 0):
                m, src = measured.get(i), "red-cell"
            if m is None or not m > 0:
                out[i] = float(d) * self.context
                self.sources["self-fallback"] += 1
                log.info("no pixel size for a cell (red-cell ruler failed): window = own diameter x %.2f",
                         self.context)
                continue
            out[i] = self.side_from_mpp(m)
            self.sources[src] += 1
        return out

    def pooled_reading(self, cells) -> PooledReading:
        """One µm/px for a sample of ``(crop, diameter_px)`` from one source: the median of
        their ruler readings when at least :data:`POOL_MIN_OK` succeed and their quartile
        spread is at most :data:`POOL_SPREAD` (else ``mpp`` None: measure each crop).

        The training images' pixel size is pooled the same way (``train wbc --scale
        red-cell``), so a pooled reading is both faster and closer to training than one per
        crop, which varies by about ±5 % with the red cells each crop happens to hold.
        """
        return pool_readings(self.crop_readings(cells), len(cells))

    def crop_readings(self, cells) -> list[float | None]:
        """The ruler's µm/px of each ``(crop, diameter_px)`` (a crop centred on its cell; None
        where the ruler fails), read at the cell's working resolution on two threads
        (numpy/scipy work that releases the GIL; same readings as one thread)."""

        def one(cell):
            crop, d = cell
            h, w = crop.shape[:2]
            return self.ruler_mpp(crop, [((h - 1) / 2, (w - 1) / 2, float(d))], cell_px=float(d))

        if len(cells) < 2:
            return [one(c) for c in cells]
        with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
            return list(pool.map(one, cells))


def known_mpp(mpp, n: int) -> np.ndarray:
    """``mpp`` (None, one value, or one per cell with None entries) as ``n`` floats, nan where
    unknown."""
    if mpp is None:
        return np.full(n, np.nan)
    values = [np.nan if m is None else m for m in np.atleast_1d(mpp)]
    return np.broadcast_to(np.asarray(values, float), (n,)).copy()


def pool_sample(n: int, k: int = POOL_SAMPLE) -> np.ndarray:
    """Indices of the ``k`` items, evenly spread, that a pooled reading of ``n`` items reads
    (all of them when there are fewer).

    Examples
    --------
    >>> pool_sample(5).tolist(), len(pool_sample(1000)), pool_sample(0).tolist()
    ([0, 1, 2, 3, 4], 24, [])
    """
    if n <= 0:
        return np.zeros(0, int)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def pool_readings(readings, n_read: int, *, min_ok: int = POOL_MIN_OK,
                  max_spread: float = POOL_SPREAD) -> PooledReading:
    """The median of ``readings`` (None entries failed) when at least ``min_ok`` succeeded and
    their quartile spread (IQR / median) is at most ``max_spread``; else ``mpp`` None."""
    ok = np.asarray([r for r in readings if r], float)
    if len(ok) < min_ok:
        return PooledReading(None, n_read, len(ok), float("nan"))
    q25, med, q75 = np.percentile(ok, [25, 50, 75])
    spread = float((q75 - q25) / med)
    return PooledReading(float(med) if spread <= max_spread else None, n_read, len(ok), spread)


def field_mpp_for_cells(ws: WindowScale, image: np.ndarray, centers, diameters, *,
                        at_cell_scale: bool = False) -> float | None:
    """One ruler reading for a field (its white cells excluded), or None. ``at_cell_scale``:
    read at the working resolution a crop of its median white cell is read at (faster on
    fields of large cells; the smear pipeline's reading)."""
    exclude = [(float(c[0]), float(c[1]), float(d)) for c, d in zip(centers, diameters, strict=True)]
    cell_px = float(np.median(diameters)) if at_cell_scale and len(diameters) else None
    return ws.ruler_mpp(image, exclude, cell_px=cell_px)


__all__ = ["POOL_SAMPLE", "SCALE_MODES", "PooledReading", "WindowScale", "field_mpp_for_cells",
           "known_mpp", "pool_readings", "pool_sample"]
