"""Python API: analyse an image or slide with a task's model, headless.

The task (``"nuclei"``, ``"smear"``, ``"mitosis"`` or any registered one, see
:mod:`napari_hemato.tasks`) decides the default model, the pixel-size policy and
the second stages; the engine (:mod:`napari_hemato.core.engine`) does the tiling.

Examples
--------
>>> import napari_hemato as nh
>>> from napari_hemato.samples import sample_path
>>> result = nh.analyze(sample_path("he_slide"), task="nuclei", roi=(1500, 850, 1756, 1106))
>>> result.status, len(result.table()) > 20  # nuclei in a 256² px region
('complete', True)
>>> gen = nh.api.iter_analyze(sample_path("he_slide"), task="nuclei", roi=(1500, 850, 1756, 1106))
>>> first = next(gen); first.total
1
>>> gen.close()
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.colour_match import for_image
from napari_hemato.core.engine import Progress, RunResult, drain, iter_run
from napari_hemato.core.errors import StoreError
from napari_hemato.core.slide import Slide, open_slide
from napari_hemato.core.tissue import TissueMask
from napari_hemato.core.tissue_io import resolve_tissue
from napari_hemato.tasks import Task, get_task, task_names

__all__ = ["Progress", "RunResult", "TissueMask", "analyze", "analysed_area_mm2", "finetune",
           "iter_analyze", "load_predictor", "pixel_size_origin", "task_names"]

PathLike = str | os.PathLike


def load_predictor(task: str | Task, model: PathLike | None = None, *, providers=None,
                   threads: int | None = None, precision: str | None = None):
    """The ONNX predictor of ``task``: its bundled model, or the model folder ``model``.

    Raises :class:`~napari_hemato.core.errors.ModelError` for an unknown task or a
    model made for another task.
    """
    return get_task(task).load_predictor(model, providers=providers, threads=threads,
                                         precision=precision)


@dataclass(frozen=True)
class Phase:
    """A step before the first tile (``iter_analyze(..., phases=True)``): what the run is
    doing while no tile is finished yet, e.g. ``"loading the model"``."""

    name: str


def iter_analyze(
    image: PathLike | Slide,
    *,
    task: str | Task = "nuclei",
    model: PathLike | None = None,
    classifier: PathLike | bool | None = None,
    mpp: float | None = None,
    estimate_mpp: bool = True,
    out: PathLike | None = None,
    roi: tuple[int, int, int, int] | None = None,
    tile: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    scheduler=None,
    cancel: CancelToken | None = None,
    providers=None,
    threads: int | None = None,
    tissue=None,
    phases: bool = False,
    precision: str | None = None,
    pooled_mpp: dict[tuple[int, int], float] | None = None,
) -> Generator[Progress, None, RunResult]:
    """Generator twin of :func:`analyze`: yields :class:`Progress`, returns the result.

    With ``phases``, :class:`Phase` events also tell what happens before the first tile
    (loading the models, opening the image, measuring its pixel size), which can take
    seconds. Closing the generator (or cancelling ``cancel``) stops the run; finished
    tiles stay in ``out`` and ``resume=True`` continues them. ``pooled_mpp``: pixel sizes
    measured once for a folder by image size (:meth:`Task.pool_pixel_sizes`), used for an
    image of that size that states none instead of measuring it again.
    """
    choice = get_task(task).tissue_default if tissue is None else tissue
    task = get_task(task)
    if phases:
        yield Phase("loading the model")
    predictor = task.load_predictor(model, providers=providers, threads=threads,
                                    precision=precision)
    stages = task.load_stages(classifier=classifier, providers=providers, threads=threads)
    owned = not isinstance(image, Slide)
    opened = open_slide(image, mpp=mpp) if owned else image
    try:
        if phases and opened.mpp is None and estimate_mpp:
            yield Phase("measuring the pixel size")
        # a model that matches colours measures this image's once (every tile and probe alike)
        predictor = for_image(predictor, opened, roi=roi)
        pooled = (pooled_mpp or {}).get(tuple(opened.shape[:2]))
        # only when there is one: a task written before the keyword keeps working
        slide = task.prepare_slide(opened, predictor, roi=roi, estimate_mpp=estimate_mpp,
                                   **({"pooled_mpp": pooled} if pooled else {}))
        stored = _stored_tissue(out) if resume else False
        if phases and isinstance(choice, str) and choice == "auto" and stored is False:
            yield Phase("finding the tissue")
        mask = resolve_tissue(slide, choice, roi=roi, stored=stored, detect=task.find_tissue)
        if phases:
            yield Phase("planning the tiles")
        result = yield from iter_run(slide, predictor, out=out, roi=roi, tile=tile,
                                     batch_size=batch_size, resume=resume, overwrite=overwrite,
                                     scheduler=scheduler, cancel=cancel, tissue=mask)
        if result.status == "complete":
            task.finish(result, slide, stages)
    finally:
        if owned:
            opened.close()
    return result


def _stored_tissue(out) -> TissueMask | None | bool:
    """The tissue mask of the run in ``out`` being resumed (None: it had none; False: there
    is no readable run there, the engine says why)."""
    if out is None or not Path(out).exists():
        return False
    try:
        from napari_hemato.core.store import ResultStore

        return ResultStore.open(out).tissue()
    except StoreError:
        return False


def analyze(
    image: PathLike | Slide,
    *,
    task: str | Task = "nuclei",
    model: PathLike | None = None,
    classifier: PathLike | bool | None = None,
    mpp: float | None = None,
    estimate_mpp: bool = True,
    out: PathLike | None = None,
    roi: tuple[int, int, int, int] | None = None,
    tile: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    scheduler=None,
    cancel: CancelToken | None = None,
    providers=None,
    threads: int | None = None,
    tissue=None,
    precision: str | None = None,
) -> RunResult:
    """Run a task's model over an image or slide, tiled, and return the result.

    Parameters
    ----------
    image : path or Slide
        Any format :func:`napari_hemato.core.slide.open_slide` reads.
    task : str or Task
        ``"nuclei"``, ``"smear"``, ``"mitosis"`` or a registered task
        (:func:`napari_hemato.tasks.task_names`).
    model : path, optional
        A model folder (ONNX + ``model.json``); default: the task's bundled model.
    classifier : path or False, optional
        Smear: the WBC classifier folder (default bundled; ``False`` for none).
    mpp : float, optional
        Level-0 µm/px, overriding the file's.
    estimate_mpp : bool
        Smear fields that state no pixel size: measure it on the red cells (else the
        model's ``assumed_input_mpp`` is assumed and flagged).
    out : path, optional
        The result store (``.zarr`` folder); a temporary one by default.
    roi : (y0, x0, y1, x1), optional
        Region in level-0 pixels; default the whole image.
    tile, batch_size : int, optional
        Tile core (model pixels) and tiles per inference call; default from the model.
    resume, overwrite : bool
        Continue the run in ``out`` / replace it.
    scheduler : distributed.Client or str, optional
        Run the tiles on a dask.distributed cluster.
    cancel : CancelToken, optional
        Cancelling it stops the run within about a second.
    providers : {"cpu", "cuda", "auto"} or list, optional
        onnxruntime execution providers.
    threads : int, optional
        onnxruntime intra-op threads.
    precision : {"auto", "float", "int8"}, optional
        The network to run when the model has an int8 version: ``auto`` (default, or
        ``NAPARI_HEMATO_PRECISION``) takes it on the CPU and the float one on a GPU.
    tissue : "auto", "none", path, TissueMask or array, optional
        Which tiles to read (default: the task's ``tissue_default``, ``"auto"``). ``"auto"``
        detects the tissue (H&E) or the reading zone (a smear scan; a camera field is read
        whole) at low resolution and skips tiles off it (resuming: the mask the run started
        with; :meth:`Task.find_tissue`); a path is
        a PNG / TIFF binary mask of the whole slide (any resolution) or a GeoJSON of
        polygons in level-0 pixels; an array is a mask of the whole slide; a
        :class:`TissueMask` is used as it is. A slide without tissue ends at once with
        the warning "no tissue found" in ``result.warnings`` and an empty table.

    Returns
    -------
    RunResult
        ``.table()`` is the per-object table, ``.labels()`` the instance labels.
    """
    return drain(iter_analyze(
        image, task=task, model=model, classifier=classifier, mpp=mpp, estimate_mpp=estimate_mpp,
        out=out, roi=roi, tile=tile, batch_size=batch_size, resume=resume, overwrite=overwrite,
        scheduler=scheduler, cancel=cancel, providers=providers, threads=threads, tissue=tissue,
        precision=precision))


def pixel_size_origin(result: RunResult) -> str:
    """Where a run's pixel size came from: ``"stated"`` (file or user), ``"confirmed"`` (the
    training images' value, which the red cells agreed with), ``"measured"`` (on the red
    cells) or ``"assumed"`` (the image stated none)."""
    if result.grid.mpp_assumed:
        return "assumed"
    if result.store.config["slide"].get("mpp_source") != "red-cells":
        return "stated"
    return "confirmed" if result.grid.mpp0 == result.spec.assumed_input_mpp else "measured"


def analysed_area_mm2(result: RunResult) -> float | None:
    """The area a run's rates are over, in mm²: the tissue inside its region when it had
    a tissue mask, else the whole region (None when the pixel size is assumed)."""
    grid = result.grid
    if grid.mpp_assumed:
        return None
    if result.tissue is not None:
        return result.tissue.area_mm2_in(tuple(grid.roi), mpp0=grid.mpp0)
    y0, x0, y1, x1 = grid.roi
    return (y1 - y0) * (x1 - x0) * grid.mpp0**2 / 1e6


def finetune(kind: str, data: PathLike | list[PathLike], out: PathLike, *,
             base: PathLike | None = None, max_minutes: float = 2.0, progress=None,
             overwrite: bool = False, threads: int | None = None):
    """Fine-tune a model on a user's corrections, in the base install (no torch).

    Parameters
    ----------
    kind : {"wbc", "mitosis", "nuclei"}
        ``wbc``: the white-cell classifier, from a crops export (reviewed / corrected rows)
        or class folders of single-cell images (the 11 classes, or coarse groups NEU, LY,
        MO, EO, BA, IG); ``mitosis``: the mitosis detector, from points CSV exports
        (accepted, rejected and added points) beside their images; ``nuclei``: the nucleus
        segmenter, from corrected masks (label TIFF, OME-Zarr, COCO or GeoJSON exports with
        their images; each exported region is taken as reviewed).
    data : path or list of paths
        Exported corrections.
    out : path
        The model folder to write (ONNX + model.json + MODEL_CARD.md + metrics.json).
    base : path, optional
        The model to start from (default: the bundled one).
    max_minutes : float
        Time budget of the settings search.
    progress : napari_hemato.finetune.common.Progress, optional
        Receives ``(step, fraction)``; its cancel token stops the fine-tune (nothing written).

    Returns
    -------
    napari_hemato.finetune.common.FinetuneResult
        ``.folder`` (use it as ``model=``), ``.metrics`` (before / after), ``.corrections``.

    Examples
    --------
    >>> result = finetune("wbc", "my_crops", "my_wbc_model")  # doctest: +SKIP
    >>> analyze("smear.jpg", task="smear", classifier=result.folder)  # doctest: +SKIP
    """
    from napari_hemato.finetune import finetune as _finetune

    return _finetune(kind, data, out, base=base, max_minutes=max_minutes, progress=progress,
                     overwrite=overwrite, threads=threads)
