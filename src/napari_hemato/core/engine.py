"""The tiled inference engine: plan -> read -> predict -> own -> write -> stitch.

:func:`iter_run` is a generator: it yields a :class:`Progress` event after each
batch of tiles and returns a :class:`RunResult`; :func:`run` drains it. Every
finished tile is on disk before its progress event is yielded, so stopping the
generator (``close()``), a :class:`CancelToken`, Ctrl-C or a killed process
loses at most the tiles in flight, and ``resume=True`` continues where the run
stopped (after checking the store: damaged tiles are redone, damaged label
chunks assembled again, see :meth:`ResultStore.verify`). Memory is bounded by
tile size × batch size (plus a prefetched batch), not by slide size.

With a tissue mask (:mod:`napari_hemato.core.tissue`), tiles whose core (grown by
the halo) touches no tissue are never read: they count as done and empty, so
stitching, resume and the table treat them like tiles that found nothing. The mask
is saved in the store, and a resume must use the same one.

Example
-------
>>> from napari_hemato.core.slide import open_slide          # doctest: +SKIP
>>> from napari_hemato.models.onnx_backend import OnnxPredictor  # doctest: +SKIP
>>> result = run(open_slide("slide.svs"), OnnxPredictor("model_dir"), out="res.zarr")  # doctest: +SKIP
>>> result.table().head()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core import label_pyramid
from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import Cancelled, ModelError, StoreError, WriteError
from napari_hemato.core.executors import distributed_batches, local_batches
from napari_hemato.core.geometry import WorkGrid
from napari_hemato.core.objects import id_stride
from napari_hemato.core.sink import TileSink
from napari_hemato.core.spec import ModelSpec
from napari_hemato.core.stitching import nms_points
from napari_hemato.core.store import ResultStore
from napari_hemato.core.table import table_columns, tile_table
from napari_hemato.core.tiling import TilePlan, auto_tile, plan_tiles
from napari_hemato.core.tissue import TissueMask, tiles_off_tissue
from napari_hemato.core.tissue_io import MASK_FILE, mask_bytes

log = logging.getLogger(__name__)
AUTO_BATCH_PIXELS = 2_500_000
NO_TISSUE = "no tissue found: no tile was analysed (pass tissue='none' to read every tile)"


@dataclass(frozen=True)
class RunInfo:
    """What a consumer needs to follow a run while it goes on, without reading its store.

    ``path`` is the result store, ``kind`` the model's output kind (``"instances"`` or
    ``"points"``) and ``grid`` the work grid (placement in µm, the pixel size used).
    The store's metadata is written by the engine's thread; a viewer must take these
    from the events, never parse the store while the run writes it.
    """

    path: Path
    kind: str
    grid: WorkGrid


@dataclass(frozen=True)
class Progress:
    """One step of a run: ``done`` of ``total`` tiles are finished."""

    done: int
    total: int
    skipped: int
    n_objects: int
    elapsed: float
    tiles: tuple[int, ...] = ()
    run: RunInfo | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class RunResult:
    """What a run produced; the data itself lives in the result store."""

    store: ResultStore
    status: str
    spec: ModelSpec
    grid: WorkGrid
    plan: TilePlan
    n_done: int
    n_objects: int
    elapsed: float
    timings: dict[str, float] = field(default_factory=dict)
    #: the tissue mask the run used (None: every tile was read)
    tissue: TissueMask | None = None
    #: tiles not read because they touch no tissue
    n_off_tissue: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.store.path

    def table(self) -> pd.DataFrame:
        """The per-object table (see :mod:`napari_hemato.core.table`)."""
        return self.store.table()

    def labels(self):
        """Instance labels on the work grid as a zarr array (None for point models)."""
        return self.store.labels

    def label_levels(self) -> list:
        """The labels and their lower-resolution levels (:mod:`.label_pyramid`), level 0
        first; built here for a finished run that has none (made by an older version)."""
        if self.store.labels is None:
            return []
        if self.status == "complete":
            try:
                label_pyramid.ensure(self.store.group)
            except (OSError, PermissionError) as err:  # a read-only store: level 0 only
                log.warning("%s: lower-resolution labels not built (%s)", self.store.path, err)
        return label_pyramid.levels(self.store.group)


def open_result(path) -> RunResult:
    """Reopen a finished (or cancelled) run from its result store."""
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
    tissue = store.tissue()
    skip = tiles_off_tissue(plan, grid, tissue) if tissue is not None else set()
    done = store.done_tiles() | skip
    n = len(store.table()) if store.status == "complete" else 0
    return RunResult(store, store.status, spec, grid, plan, len(done), n, 0.0, tissue=tissue,
                     n_off_tissue=len(skip), warnings=tuple(cfg.get("warnings", ())))


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
    batch_size: int | None = None,
    mpp_tolerance: float = 0.05,
    resume: bool = False,
    overwrite: bool = False,
    scheduler=None,
    cancel: CancelToken | None = None,
    tissue: TissueMask | None = None,
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
        Tile core size in model pixels (default: the model's, grown up to inputs of
        :data:`~napari_hemato.core.tiling.MAX_AUTO_INPUT` px where that reads fewer pixels,
        :func:`~napari_hemato.core.tiling.auto_tile`; a resumed run keeps its own).
    batch_size : int, optional
        Tiles per inference call (default: as many as fit in ~2.5 megapixels of
        network input, 1 to 8; larger batches only add memory traffic on CPU
        and make progress and cancelling coarser).
    resume : bool
        Continue a cancelled run in ``out`` (skips finished tiles).
    overwrite : bool
        Replace an existing result store at ``out``.
    scheduler : distributed.Client or str, optional
        Run tiles on a dask.distributed cluster (client or scheduler address).
    cancel : CancelToken, optional
        Cancelling it stops the run within about a second.
    tissue : TissueMask, optional
        Read only the tiles touching it (see :func:`napari_hemato.core.tissue_io.resolve_tissue`
        for masks from files, arrays or detection); None reads every tile.
    """
    spec = predictor.spec
    if spec.kind not in ("instances", "points"):
        raise ModelError(f"{spec.name}: a {spec.kind} model cannot run on slide tiles")
    cancel = cancel or CancelToken()
    grid = WorkGrid.for_model(slide, spec.mpp, roi=roi, tolerance=mpp_tolerance,
                              assumed_mpp=spec.assumed_input_mpp)
    try:
        if tile is None and resume and out is not None and Path(out).exists():
            tile = _stored_tile(out)  # a run being resumed keeps its tiles
        if tile is None:  # the model's tile, grown where that reads fewer pixels
            tile = auto_tile(grid.shape, tile=spec.tile, halo=spec.halo,
                             size_divisor=spec.size_divisor)
        plan = plan_tiles(grid.shape, tile=tile, halo=spec.halo, size_divisor=spec.size_divisor)
        stride = id_stride(len(plan))
    except ValueError as err:  # a tile size this model cannot run with: the caller's to fix
        raise ModelError(f"model {spec.name!r}: {err}") from None
    if batch_size is None:
        batch_size = min(8, max(1, int(AUTO_BATCH_PIXELS // plan.input_size**2)))
    scale, translate = grid.napari_placement()
    skip = tiles_off_tissue(plan, grid, tissue) if tissue is not None else set()
    warnings = (NO_TISSUE,) if tissue is not None and len(skip) == len(plan) else ()
    config = {
        "kind": spec.kind,
        "slide": {"path": str(slide.path), "shape": list(slide.shape), "mpp": slide.mpp,
                  "mpp_source": slide.mpp_source},
        "model": {"name": spec.name, "version": spec.version, "fingerprint": spec.fingerprint,
                  "task": spec.task, "class_names": list(spec.class_names),
                  "weights": getattr(predictor, "precision", "float")},
        "spec": spec.to_dict(),
        "grid": grid.to_dict(),
        "plan": plan.to_dict(),
        "id_stride": stride,
        "placement": [list(scale), list(translate)],
        "unit": "pixel" if grid.mpp_assumed else "micrometer",
        "tissue": None if tissue is None else tissue.identity(),
        "tissue_info": None if tissue is None else {
            "source": tissue.source, "mpp": tissue.mpp, "area_mm2": tissue.area_mm2,
            "area_mm2_in_region": tissue.area_mm2_in(grid.roi), "tiles_off_tissue": len(skip)},
        "warnings": list(warnings),
    }
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="hemato-")) / "result.zarr"
    out = Path(out)
    if resume and out.exists():
        store = ResultStore.open(out)
        store.check_resumable(config)
        store.verify()  # damaged tiles are redone, damaged labels chunks assembled again
        store.set_status("running")
    else:
        files = {MASK_FILE: mask_bytes(tissue)} if tissue is not None else None
        store = ResultStore.create(out, config, overwrite=overwrite, files=files)

    timings: dict[str, float] = {"read": 0.0, "predict": 0.0, "postprocess": 0.0, "write": 0.0,
                                 "stitch": 0.0}
    sink = TileSink(store, plan, spec.kind, timings=timings, skip=skip)
    skipped = len(sink.done)
    pending = [i for i in plan.order() if i not in sink.done]
    info = RunInfo(out, spec.kind, grid)
    log.info("%s: %d tiles (%d off the tissue, %d already done), work grid %s at %.3f µm/px",
             slide.path, len(plan), len(skip), skipped - len(skip), grid.shape, grid.mpp)
    for warning in warnings:
        log.warning("%s: %s", slide.path, warning)
    t0 = time.perf_counter()
    n_objects = 0
    sink.stitch(sorted(sink.done))  # chunks a cancelled run could not assemble yet
    status = "failed"
    try:
        if scheduler is None:
            batches = local_batches(slide, predictor, grid, plan, stride, pending, batch_size,
                                    cancel, sink, timings)
        else:
            batches = distributed_batches(scheduler, slide, predictor, grid, plan, stride,
                                          pending, batch_size, cancel, sink)
        for outputs in batches:
            yield Progress(len(sink.done), len(plan), skipped, sink.n_objects,
                           time.perf_counter() - t0, tuple(o.index for o in outputs), info)
        if cancel.cancelled or len(sink.done) < len(plan):
            raise Cancelled("run cancelled")
        n_objects = _finalize(store, plan, grid, spec, timings, skip)
        if store.labels is not None:
            label_pyramid.build(store.group)
        status = "complete"
    except Cancelled:
        status = "cancelled"
        log.info("%s: cancelled after %d of %d tiles; resume to continue", out, len(sink.done),
                 len(plan))
    except (GeneratorExit, KeyboardInterrupt):
        status = "cancelled"
        raise
    finally:
        try:
            store.set_status(status, n_done=len(sink.done))
        except WriteError as err:  # e.g. the disk is full: keep the error that stopped the run
            if sys.exc_info()[1] is None:
                raise
            log.info("status not recorded: %s", err)
    return RunResult(store, status, spec, grid, plan, len(sink.done), n_objects,
                     time.perf_counter() - t0, timings, tissue=tissue, n_off_tissue=len(skip),
                     warnings=warnings)


def _finalize(store: ResultStore, plan: TilePlan, grid: WorkGrid, spec, timings,
              skip: set[int]) -> int:
    """Write the object table (global NMS for points); returns the row count."""
    ts = time.perf_counter()
    keep_ids = None
    read = [i for i in range(len(plan)) if i not in skip]
    if spec.kind == "points":
        tiles = [store.read_tile(i) for i in read]
        yx = np.concatenate([np.zeros((0, 2))] + [np.column_stack([t.columns["y"], t.columns["x"]])
                                                  for t in tiles])
        scores = np.concatenate([np.zeros(0)] + [t.columns["score"] for t in tiles])
        ids = np.concatenate([np.zeros(0, np.int64)] + [t.columns["id"] for t in tiles])
        radius = float(spec.postprocess.get("min_distance_um", 5.0)) / grid.mpp
        keep_ids = set(ids[nms_points(yx, scores, radius)].tolist())

    def frames():
        for i in read:
            frame = tile_table(store.read_tile(i), grid, spec)
            if keep_ids is not None:
                frame = frame[frame["id"].isin(keep_ids)]
            yield frame

    n = store.write_table(frames(), table_columns(spec.class_names))
    timings["table"] = time.perf_counter() - ts
    return n


def _stored_tile(out) -> int | None:
    """The tile core of the run stored at ``out`` (None when it cannot be read: the
    resume check then says what is wrong)."""
    try:
        return int(ResultStore.open(out).config["plan"]["tile"])
    except (StoreError, KeyError, TypeError, ValueError, OSError):
        return None
