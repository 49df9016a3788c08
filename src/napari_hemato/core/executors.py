"""How tiles get computed: a local pipeline, or a dask.distributed cluster.

Both yield lists of :class:`TileOutput` that are already on disk (written by
the :class:`TileSink`), in batches.

The local pipeline overlaps three stages on different threads: reading the
next batch, running the model on this one (onnxruntime releases the GIL), and
post-processing + writing + stitching the previous one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import Cancelled
from napari_hemato.core.geometry import WorkGrid
from napari_hemato.core.objects import TileOutput, tile_objects
from napari_hemato.core.single_tile import predict_single_tile
from napari_hemato.core.sink import TileSink
from napari_hemato.core.tiling import Tile, TilePlan


def read_batch(slide, grid: WorkGrid, tiles: list[Tile], fill: int) -> np.ndarray:
    return np.stack([grid.read(slide, t.outer, fill=fill) for t in tiles])


def own_objects(raw: dict, tiles: list[Tile], spec, grid: WorkGrid, plan: TilePlan,
                stride: int, images: np.ndarray | None = None, outer=None) -> list[TileOutput]:
    """Split a batch's outputs per tile and keep each tile's owned objects (``images``: the
    tiles' inputs, for a stain rule; ``outer``: the box the outputs cover when it is not the
    tile's own, see :func:`single_tile`)."""
    return [tile_objects({role: o[k] for role, o in raw.items()}, t, plan, spec, grid.mpp,
                         stride=stride, grid=grid, image=None if images is None else images[k],
                         outer=outer)
            for k, t in enumerate(tiles)]


def single_tile(slide, predictor, grid: WorkGrid, plan: TilePlan, stride: int, index: int,
                cancel: CancelToken, sink: TileSink, timings: dict) -> Iterator[list[TileOutput]]:
    """The one tile of a small image, read with less padding (see
    :mod:`napari_hemato.core.single_tile`); no reader or finisher threads."""
    spec = predictor.spec
    tile = plan[index]
    if cancel.cancelled:
        return
    try:
        raw, box, image = predict_single_tile(
            predictor, grid, plan, tile, cancel, timings,
            lambda b: grid.read(slide, b, fill=spec.pad_value))
    except Cancelled:
        return
    t = time.perf_counter()
    outs = own_objects(raw, [tile], spec, grid, plan, stride, image[None], outer=box)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t
    sink.add(outs)
    yield outs


def local_batches(slide, predictor, grid: WorkGrid, plan: TilePlan, stride: int,
                  pending: list[int], batch_size: int, cancel: CancelToken, sink: TileSink,
                  timings: dict) -> Iterator[list[TileOutput]]:
    """Pipelined local execution; stops early (keeping finished tiles) on cancel."""
    if len(plan) == 1 and len(pending) == 1:
        yield from single_tile(slide, predictor, grid, plan, stride, pending[0], cancel, sink,
                               timings)
        return
    groups = [[plan[i] for i in pending[k : k + batch_size]] for k in range(0, len(pending), batch_size)]
    spec = predictor.spec

    def read(tiles):
        t = time.perf_counter()
        return read_batch(slide, grid, tiles, spec.pad_value), time.perf_counter() - t

    def finish(raw, tiles, images):
        t = time.perf_counter()
        outs = own_objects(raw, tiles, spec, grid, plan, stride, images)
        timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t
        sink.add(outs)
        return outs

    with ThreadPoolExecutor(1, thread_name_prefix="hemato-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="hemato-finish") as finisher:
        next_read = reader.submit(read, groups[0]) if groups else None
        previous = None
        for k, tiles in enumerate(groups):
            if cancel.cancelled:
                break
            images, dt = next_read.result()
            timings["read"] = timings.get("read", 0.0) + dt
            next_read = reader.submit(read, groups[k + 1]) if k + 1 < len(groups) else None
            t = time.perf_counter()
            try:
                raw = predictor.predict(images, cancel=cancel)
            except Cancelled:
                break
            timings["predict"] = timings.get("predict", 0.0) + time.perf_counter() - t
            current = finisher.submit(finish, raw, tiles, images)
            if previous is not None:
                yield previous.result()
            previous = current
        if previous is not None:
            yield previous.result()
        if next_read is not None:
            next_read.cancel()


def _remote_batch(slide_path, slide_mpp, predictor, grid, plan, stride, indices):
    """Runs on a dask worker: open the slide (cached per worker process) and process tiles."""
    slide = _worker_slide(str(slide_path), slide_mpp)
    tiles = [plan[i] for i in indices]
    images = read_batch(slide, grid, tiles, predictor.spec.pad_value)
    return own_objects(predictor.predict(images), tiles, predictor.spec, grid, plan, stride, images)


_WORKER_SLIDES: dict[tuple[str, float | None], object] = {}


def _worker_slide(path: str, mpp: float | None):
    from napari_hemato.core.slide import open_slide

    key = (path, mpp)
    if key not in _WORKER_SLIDES:
        _WORKER_SLIDES[key] = open_slide(path, mpp=mpp)
    return _WORKER_SLIDES[key]


def distributed_batches(scheduler, slide, predictor, grid: WorkGrid, plan: TilePlan, stride: int,
                        pending: list[int], batch_size: int, cancel: CancelToken,
                        sink: TileSink) -> Iterator[list[TileOutput]]:
    """Batches on a dask.distributed cluster, a bounded number in flight.

    Workers read the slide from its path (it must be reachable from them),
    predict and post-process; this process writes and stitches.
    """
    from distributed import Client, as_completed

    own_client = not isinstance(scheduler, Client)
    client = Client(scheduler) if own_client else scheduler
    try:
        groups = [pending[k : k + batch_size] for k in range(0, len(pending), batch_size)]
        limit = 2 * max(len(client.scheduler_info().get("workers", {})), 1)
        [remote_predictor] = client.scatter([predictor], broadcast=True)
        futures = as_completed()
        submitted = 0

        def submit(group):
            return client.submit(_remote_batch, slide.path, slide.mpp, remote_predictor, grid, plan,
                                 stride, group, pure=False)

        while submitted < min(limit, len(groups)):
            futures.add(submit(groups[submitted]))
            submitted += 1
        for future in futures:
            if cancel.cancelled:
                for f in futures.futures:
                    f.cancel()
                break
            outs = future.result()
            sink.add(outs)
            yield outs
            if submitted < len(groups):
                futures.add(submit(groups[submitted]))
                submitted += 1
    finally:
        if own_client:
            client.close()
