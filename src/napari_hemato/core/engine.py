"""The tiled inference engine: plan -> read -> predict -> own -> write -> stitch.

:func:`iter_run` is a generator: it yields a :class:`Progress` event after each
batch of tiles and returns a :class:`RunResult`; :func:`run` drains it. Every
finished tile is on disk before its progress event is yielded, so stopping the
generator (``close()``), a :class:`CancelToken`, Ctrl-C or a killed process
loses at most the tiles in flight, and ``resume=True`` continues where the run
stopped. Memory is bounded by tile size × batch size (plus a prefetched batch),
not by slide size.

Example
-------
>>> from napari_hemato.core.slide import open_slide          # doctest: +SKIP
>>> from napari_hemato.models.onnx_backend import OnnxPredictor
>>> result = run(open_slide("slide.svs"), OnnxPredictor("model_dir"), out="res.zarr")
>>> result.table().head()
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import Cancelled, ModelError
from napari_hemato.core.geometry import WorkGrid
from napari_hemato.core.objects import TileOutput, id_stride, tile_objects
from napari_hemato.core.stitching import assemble_chunk, nms_points, ready_chunks
from napari_hemato.core.store import ResultStore
from napari_hemato.core.table import table_columns, tile_table
from napari_hemato.core.tiling import Tile, TilePlan, plan_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One step of a run: ``done`` of ``total`` tiles are finished."""

    done: int
    total: int
    skipped: int
    n_objects: int
    elapsed: float
    tiles: tuple[int, ...] = ()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class RunResult:
    """What a run produced; the data itself lives in the result store."""

    store: ResultStore
    status: str
    spec: object
    grid: WorkGrid
    plan: TilePlan
    n_done: int
    n_objects: int
    elapsed: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.store.path

    def table(self) -> pd.DataFrame:
        """The per-object table (see :mod:`napari_hemato.core.table`)."""
        return self.store.table()

    def labels(self):
        """Instance labels on the work grid as a zarr array (None for point models)."""
        return self.store.labels


def open_result(path) -> RunResult:
    """Reopen a finished (or cancelled) run from its result store."""
    from napari_hemato.models.spec import ModelSpec

    store = ResultStore.open(path)
    cfg = store.config
    g = {k: v for k, v in cfg["grid"].items() if k != "shape"}
    g["roi"] = tuple(g["roi"])
    grid = WorkGrid(**g)
    p = cfg["plan"]
    plan = TilePlan(tuple(p["shape"]), p["tile"], p["halo"], p["input_size"], tuple(p["grid"]))
    spec_fields = dict(cfg["spec"])
    spec_fields["class_names"] = tuple(spec_fields["class_names"])
    spec = ModelSpec(**spec_fields)
    done = store.done_tiles()
    n = len(store.table()) if store.status == "complete" else 0
    return RunResult(store, store.status, spec, grid, plan, len(done), n, 0.0)


def drain(gen: Generator[Progress, None, RunResult]) -> RunResult:
    """Exhaust a progress generator and return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run(slide, predictor, **kwargs) -> RunResult:
    """Run :func:`iter_run` to the end and return its result."""
    return drain(iter_run(slide, predictor, **kwargs))


def iter_run(
    slide,
    predictor,
    *,
    out: str | Path | None = None,
    roi=None,
    tile: int | None = None,
    batch_size: int = 4,
    mpp_tolerance: float = 0.05,
    resume: bool = False,
    overwrite: bool = False,
    scheduler=None,
    cancel: CancelToken | None = None,
) -> Generator[Progress, None, RunResult]:
    """Tiled, resumable inference of ``predictor`` over ``slide``.

    Parameters
    ----------
    slide : Slide
        An opened slide (:func:`napari_hemato.core.slide.open_slide`).
    predictor : Predictor
        Anything with ``spec`` and ``predict`` (ONNX, fake, ...).
    out : path, optional
        Result store (``.zarr`` folder); a temporary folder if omitted.
    roi : (y0, x0, y1, x1), optional
        Region in level-0 pixels; the whole slide by default.
    tile : int, optional
        Tile core size in model pixels (default: the model's).
    batch_size : int
        Tiles per inference call.
    resume : bool
        Continue a cancelled run in ``out`` (skips finished tiles).
    overwrite : bool
        Replace an existing result store at ``out``.
    scheduler : distributed.Client or str, optional
        Run tiles on a dask.distributed cluster (client or scheduler address).
    cancel : CancelToken, optional
        Cancelling it stops the run within about a second.
    """
    spec = predictor.spec
    if spec.kind not in ("instances", "points"):
        raise ModelError(f"{spec.name}: a {spec.kind} model cannot run on slide tiles")
    cancel = cancel or CancelToken()
    grid = WorkGrid.for_model(slide, spec.mpp, roi=roi, tolerance=mpp_tolerance)
    plan = plan_tiles(grid.shape, tile=tile or spec.tile, halo=spec.halo, size_divisor=spec.size_divisor)
    stride = id_stride(len(plan))
    scale, translate = grid.napari_placement()
    config = {
        "kind": spec.kind,
        "slide": {"path": str(slide.path), "shape": list(slide.shape), "mpp": slide.mpp},
        "model": {"name": spec.name, "version": spec.version, "fingerprint": spec.fingerprint,
                  "task": spec.task, "class_names": list(spec.class_names)},
        "spec": spec.to_dict(),
        "grid": grid.to_dict(),
        "plan": plan.to_dict(),
        "id_stride": stride,
        "placement": [list(scale), list(translate)],
        "unit": "pixel" if grid.mpp_assumed else "micrometer",
    }
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="hemato-")) / "result.zarr"
    out = Path(out)
    if resume and out.exists():
        store = ResultStore.open(out)
        store.check_resumable(config)
        store.set_status("running")
    else:
        store = ResultStore.create(out, config, overwrite=overwrite)

    done = store.done_tiles()
    assembled = store.assembled()
    skipped = len(done)
    pending = [i for i in range(len(plan)) if i not in done]
    log.info("%s: %d tiles (%d already done), work grid %s at %.3f µm/px",
             slide.path, len(plan), skipped, grid.shape, grid.mpp)
    timings = {"read": 0.0, "predict": 0.0, "postprocess": 0.0, "write": 0.0, "stitch": 0.0}
    t0 = time.perf_counter()
    n_objects = 0

    def stitch(indices) -> None:
        if spec.kind != "instances":
            return
        ts = time.perf_counter()
        for c in sorted({c for i in indices for c in ready_chunks(i, plan, done, assembled)}):
            store.write_chunk(c, plan[c].core, assemble_chunk(c, plan, store.read_tile))
            assembled.add(c)
        timings["stitch"] += time.perf_counter() - ts

    stitch(sorted(done))
    status = "failed"
    try:
        if scheduler is None:
            batches = _local_batches(slide, predictor, grid, plan, stride, pending, batch_size, cancel, timings)
        else:
            batches = _distributed_batches(scheduler, slide, predictor, grid, plan, stride, pending,
                                           batch_size, cancel)
        for outputs in batches:
            tw = time.perf_counter()
            for output in outputs:
                store.write_tile(output)
                done.add(output.index)
                n_objects += output.n_objects
            timings["write"] += time.perf_counter() - tw
            stitch([o.index for o in outputs])
            yield Progress(len(done), len(plan), skipped, n_objects, time.perf_counter() - t0,
                           tuple(o.index for o in outputs))
            if cancel.cancelled:
                raise Cancelled("run cancelled")
        n_objects = _finalize(store, plan, grid, spec, timings)
        status = "complete"
    except Cancelled:
        status = "cancelled"
        log.info("%s: cancelled after %d of %d tiles; resume to continue", out, len(done), len(plan))
    except (GeneratorExit, KeyboardInterrupt):
        status = "cancelled"
        raise
    finally:
        store.set_status(status, n_done=len(done))
    return RunResult(store, status, spec, grid, plan, len(done), n_objects,
                     time.perf_counter() - t0, timings)


def _read_batch(slide, grid: WorkGrid, tiles: list[Tile], fill: int) -> np.ndarray:
    return np.stack([grid.read(slide, t.outer, fill=fill) for t in tiles])


def process_batch(images, tiles, predictor, grid, plan, stride, cancel=None, timings=None):
    """Predict a batch of tile images and keep each tile's owned objects."""
    ts = time.perf_counter()
    outputs = predictor.predict(images, cancel=cancel)
    tp = time.perf_counter()
    result = [
        tile_objects({role: o[k] for role, o in outputs.items()}, t, plan, predictor.spec,
                     grid.mpp, stride=stride)
        for k, t in enumerate(tiles)
    ]
    if timings is not None:
        timings["predict"] += tp - ts
        timings["postprocess"] += time.perf_counter() - tp
    return result


def _local_batches(slide, predictor, grid, plan, stride, pending, batch_size, cancel, timings
                   ) -> Iterator[list[TileOutput]]:
    """Batches in order, reading the next batch in a thread while predicting."""
    groups = [[plan[i] for i in pending[k : k + batch_size]] for k in range(0, len(pending), batch_size)]
    fill = predictor.spec.pad_value

    def read(tiles):
        ts = time.perf_counter()
        images = _read_batch(slide, grid, tiles, fill)
        return images, time.perf_counter() - ts

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hemato-read") as pool:
        future = pool.submit(read, groups[0]) if groups else None
        for k, tiles in enumerate(groups):
            if cancel.cancelled:
                raise Cancelled("run cancelled")
            images, dt = future.result()
            timings["read"] += dt
            future = pool.submit(read, groups[k + 1]) if k + 1 < len(groups) else None
            yield process_batch(images, tiles, predictor, grid, plan, stride, cancel, timings)
        if future is not None:
            future.cancel()


def _remote_batch(slide_path, slide_mpp, predictor, grid, plan, stride, indices):
    """Runs on a dask worker: open the slide (cached per worker) and process tiles."""
    slide = _worker_slide(str(slide_path), slide_mpp)
    tiles = [plan[i] for i in indices]
    images = _read_batch(slide, grid, tiles, predictor.spec.pad_value)
    return process_batch(images, tiles, predictor, grid, plan, stride)


_WORKER_SLIDES: dict[tuple[str, float | None], object] = {}


def _worker_slide(path: str, mpp: float | None):
    from napari_hemato.core.slide import open_slide

    key = (path, mpp)
    if key not in _WORKER_SLIDES:
        _WORKER_SLIDES[key] = open_slide(path, mpp=mpp)
    return _WORKER_SLIDES[key]


def _distributed_batches(scheduler, slide, predictor, grid, plan, stride, pending, batch_size,
                         cancel) -> Iterator[list[TileOutput]]:
    """Batches on a dask.distributed cluster, a bounded number in flight."""
    from distributed import Client, as_completed

    own_client = not isinstance(scheduler, Client)
    client = Client(scheduler) if own_client else scheduler
    try:
        groups = [pending[k : k + batch_size] for k in range(0, len(pending), batch_size)]
        n_workers = max(len(client.scheduler_info().get("workers", {})), 1)
        limit = 2 * n_workers
        [remote_predictor] = client.scatter([predictor], broadcast=True)
        futures = as_completed()
        submitted = 0

        def submit(group):
            return client.submit(_remote_batch, slide.path, slide.mpp, remote_predictor, grid, plan,
                                 stride, group, pure=False)

        while submitted < len(groups) and submitted < limit:
            futures.add(submit(groups[submitted]))
            submitted += 1
        for future in futures:
            if cancel.cancelled:
                for f in futures.futures:
                    f.cancel()
                raise Cancelled("run cancelled")
            yield future.result()
            if submitted < len(groups):
                futures.add(submit(groups[submitted]))
                submitted += 1
    finally:
        if own_client:
            client.close()


def _finalize(store: ResultStore, plan: TilePlan, grid: WorkGrid, spec, timings) -> int:
    """Write the object table (global NMS for points); returns the row count."""
    ts = time.perf_counter()
    keep_ids = None
    if spec.kind == "points":
        tiles = [store.read_tile(i) for i in range(len(plan))]
        yx = np.concatenate([np.column_stack([t.columns["y"], t.columns["x"]]) for t in tiles])
        scores = np.concatenate([t.columns["score"] for t in tiles])
        ids = np.concatenate([t.columns["id"] for t in tiles])
        radius = float(spec.postprocess.get("min_distance_um", 5.0)) / grid.mpp
        keep_ids = set(ids[nms_points(yx, scores, radius)].tolist())

    def frames():
        for i in range(len(plan)):
            frame = tile_table(store.read_tile(i), grid, spec)
            if keep_ids is not None:
                frame = frame[frame["id"].isin(keep_ids)]
            yield frame

    n = store.write_table(frames(), table_columns(spec.class_names))
    timings["table"] = time.perf_counter() - ts
    return n
