"""Pure tile planning: cores that partition an extent, halos, ownership.

Coordinates are (row, column) = (y, x) in the *work grid* (the slide resampled
to the model's µm/px, relative to the region of interest). A tile's *core*
cells partition the extent exactly; its *outer* box is the core grown by the
halo and then to a fixed input size, so every tile feeds the network the same
shape. An object belongs to the tile whose core holds its centroid, so each
object is owned by exactly one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (half-open)


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position, core box and outer (input) box."""

    index: int
    row: int
    col: int
    core: Box
    outer: Box


@dataclass(frozen=True)
class TilePlan:
    """A grid of tiles covering ``shape`` with cores of ``tile`` pixels.

    Examples
    --------
    >>> plan = plan_tiles((1000, 700), tile=512, halo=40, size_divisor=16)
    >>> plan.grid, len(plan), plan.input_size
    ((2, 2), 4, 592)
    >>> plan.owner(600.2, 10.0)
    2
    """

    shape: tuple[int, int]
    tile: int
    halo: int
    input_size: int
    grid: tuple[int, int]

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} out of range 0..{len(self) - 1}")
        row, col = divmod(index, self.grid[1])
        y0, x0 = row * self.tile, col * self.tile
        core = (y0, x0, min(y0 + self.tile, self.shape[0]), min(x0 + self.tile, self.shape[1]))
        oy, ox = y0 - self.halo, x0 - self.halo
        outer = (oy, ox, oy + self.input_size, ox + self.input_size)
        return Tile(index, row, col, core, outer)

    def owner(self, y: float, x: float) -> int | None:
        """Index of the tile whose core holds point (y, x), None if outside."""
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            return None
        return int(y // self.tile) * self.grid[1] + int(x // self.tile)

    def owners(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`owner`: tile index per point, -1 outside the extent."""
        y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
        inside = (y >= 0) & (y < self.shape[0]) & (x >= 0) & (x < self.shape[1])
        idx = (y // self.tile) * self.grid[1] + (x // self.tile)
        return np.where(inside, idx, -1).astype(np.int64)

    def neighbours(self, index: int) -> list[int]:
        """Indices of the up to 3×3 tiles around ``index`` (itself included), sorted."""
        row, col = divmod(index, self.grid[1])
        out = []
        for r in range(max(row - 1, 0), min(row + 2, self.grid[0])):
            for c in range(max(col - 1, 0), min(col + 2, self.grid[1])):
                out.append(r * self.grid[1] + c)
        return out

    def order(self, block: int = 8) -> list[int]:
        """All tile indices in column blocks of ``block`` tiles, rows top to bottom.

        Consecutive tiles stay close, so a chunk's 3×3 neighbourhood is
        finished soon after its first tile (stitching needs it complete).
        """
        rows, cols = self.grid
        return [r * cols + c for b in range(0, cols, block) for r in range(rows)
                for c in range(b, min(b + block, cols))]

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "tile": self.tile,
            "halo": self.halo,
            "input_size": self.input_size,
            "grid": list(self.grid),
        }


def plan_tiles(
    shape: tuple[int, int], *, tile: int, halo: int, size_divisor: int = 1
) -> TilePlan:
    """Plan tiles of core size ``tile`` with ``halo`` over an extent ``shape``.

    The halo must not exceed the tile: outer boxes then only ever overlap the
    3×3 neighbouring cores, which the stitcher relies on.

    Parameters
    ----------
    shape : (int, int)
        Extent (rows, columns) in work-grid pixels.
    tile : int
        Core size. A tile larger than the extent gives a single tile.
    halo : int
        Context added on every side of the core (≥ largest object + receptive field).
    size_divisor : int
        Input size is rounded up to a multiple of this (e.g. a U-Net's 2**depth).
    """
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0:
        raise ValueError(f"cannot tile an empty extent {shape}")
    if tile <= 0 or halo < 0:
        raise ValueError(f"tile must be > 0 and halo >= 0 (got tile={tile}, halo={halo})")
    tile = min(tile, max(h, w))
    grid = (math.ceil(h / tile), math.ceil(w / tile))
    if halo > tile and grid != (1, 1):
        raise ValueError(
            f"halo {halo} px exceeds tile {tile} px: use a tile of at least {halo} px"
        )
    input_size = int(math.ceil((tile + 2 * halo) / size_divisor) * size_divisor)
    return TilePlan((h, w), tile, halo, input_size, grid)


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, None when empty."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[2], b[2]), min(a[3], b[3])
    if y0 >= y1 or x0 >= x1:
        return None
    return (y0, x0, y1, x1)


#: largest input side :func:`auto_tile` grows a model's tiles to (px): a batch of one such
#: tile holds about as many pixels as the engine's automatic batch (2.5 MP), and larger
#: inputs ran slower per pixel on 2 cores (benchmarks/README.md)
MAX_AUTO_INPUT = 1824


def input_side(tile: int, halo: int, size_divisor: int = 1) -> int:
    """The network's input side for a core of ``tile`` px: ``tile + 2 halo``, rounded up."""
    return int(math.ceil((tile + 2 * halo) / size_divisor) * size_divisor)


def auto_tile(shape: tuple[int, int], *, tile: int, halo: int, size_divisor: int = 1,
              max_input: int = MAX_AUTO_INPUT) -> int:
    """The core size, at least the model's ``tile``, that feeds the network the fewest
    pixels over an extent ``shape``.

    Every tile reads its halo again: a 768 px core with a 144 px halo reads 1.9× its
    pixels. Larger cores (inputs up to ``max_input``) read less; among the cores giving
    the same tile grid the smallest is kept (least padding beyond the extent). Cores grow
    by ``size_divisor``: every tile's input then starts where the model's own tiles' would
    modulo the network's pooling, so its predictions are the same bits. An extent
    that fits one tile, or a model whose input is already ``max_input`` or more, keeps
    ``tile``.

    Examples
    --------
    >>> auto_tile((6000, 6000), tile=768, halo=144, size_divisor=16)  # 4 × 4, inputs of 1792
    1504
    >>> auto_tile((500, 600), tile=768, halo=144, size_divisor=16)
    768
    """
    h, w = (int(s) for s in shape)
    largest = max_input - 2 * halo
    if largest <= tile or max(h, w) <= tile:
        return tile
    step = max(int(size_divisor), 1)
    # cores in steps of the divisor: the pooling grid stays where it was on the image
    cores = [t for t in range(tile, largest + 1, step) if input_side(t, halo, step) <= max_input]
    cost = {t: math.ceil(h / t) * math.ceil(w / t) * input_side(t, halo, step) ** 2
            for t in cores or [tile]}
    return min(cost, key=lambda t: (cost[t], t))
