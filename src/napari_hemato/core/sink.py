"""Where finished tiles go: the result store, plus label stitching as neighbourhoods complete.

A small in-memory cache of recent fragments saves re-reading them from disk:
the engine visits tiles in column blocks (:meth:`TilePlan.order`), so the 3×3
neighbourhood of a chunk was almost always written a few dozen tiles earlier.

Tiles off the tissue (``skip``) count as done and empty: they have no file, read as
an empty fragment, and a chunk whose whole neighbourhood is skipped is background
(the labels' fill value) without being written.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from napari_hemato.core.objects import TileOutput
from napari_hemato.core.stitching import assemble_chunk, ready_chunks
from napari_hemato.core.store import ResultStore
from napari_hemato.core.tiling import TilePlan


class TileSink:
    """Write tiles, track which are done, assemble label chunks when possible."""

    def __init__(self, store: ResultStore, plan: TilePlan, kind: str, *, cache_size: int = 48,
                 timings: dict | None = None, skip: set[int] | frozenset = frozenset()) -> None:
        self.store, self.plan, self.kind = store, plan, kind
        self.skip = frozenset(skip)
        self.done = store.done_tiles() | self.skip
        self.assembled = store.assembled() | {
            c for c in self.skip if all(n in self.skip for n in plan.neighbours(c))}
        self.n_objects = 0
        self.cache_size = cache_size
        self._cache: OrderedDict[int, TileOutput] = OrderedDict()
        self.timings = timings if timings is not None else {}

    def _tick(self, key: str, since: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - since

    def read(self, index: int) -> TileOutput:
        if index in self.skip:
            return TileOutput(index, self.plan[index].outer, None, {})
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        return self._remember(self.store.read_tile(index))

    def _remember(self, out: TileOutput) -> TileOutput:
        self._cache[out.index] = out
        self._cache.move_to_end(out.index)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def add(self, outputs: list[TileOutput]) -> None:
        """Persist finished tiles (atomically, one file each), then stitch."""
        t = time.perf_counter()
        for out in outputs:
            self.store.write_tile(out)
            self.done.add(out.index)
            self.n_objects += out.n_objects
            self._remember(out)
        self._tick("write", t)
        self.stitch([o.index for o in outputs])

    def stitch(self, indices) -> None:
        """Assemble every labels chunk whose neighbourhood is now complete."""
        if self.kind != "instances":
            return
        t = time.perf_counter()
        ready = {c for i in indices for c in ready_chunks(i, self.plan, self.done, self.assembled)}
        for c in sorted(ready):
            self.store.write_chunk(c, self.plan[c].core, assemble_chunk(c, self.plan, self.read))
            self.assembled.add(c)
        self._tick("stitch", t)
