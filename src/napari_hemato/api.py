"""Python API: analyse an image or slide with a task's model, headless.

Examples
--------
>>> import napari_hemato as nh                                  # doctest: +SKIP
>>> result = nh.analyze("slide.svs", task="nuclei", out="slide.hemato.zarr")
>>> result.table()["class"].value_counts()
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator
from pathlib import Path

from napari_hemato.core.engine import Progress, RunResult, drain, iter_run
from napari_hemato.core.errors import ModelError, SlideError
from napari_hemato.core.slide import Slide, open_slide
from napari_hemato.models.onnx_backend import OnnxPredictor
from napari_hemato.models.registry import resolve_model

TASKS = ("nuclei", "smear", "mitosis")
#: a red-cell estimate within this ratio of the spec's ``assumed_input_mpp`` confirms it: the
#: estimate's p10-p90 spread on held-out BCCD fields (0.86-1.09 of the truth, see the smear card)
AGREEMENT = (0.87, 1.15)

log = logging.getLogger(__name__)


def load_predictor(task: str, model=None, *, providers=None, threads=None) -> OnnxPredictor:
    """The ONNX predictor for ``task`` (bundled) or a given model folder."""
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    predictor = OnnxPredictor(resolve_model(task, model), providers=providers, threads=threads)
    if predictor.spec.task != task:
        raise ModelError(
            f"{predictor.spec.folder}: model {predictor.spec.name!r} is for task "
            f"{predictor.spec.task!r}, not {task!r}"
        )
    return predictor


def load_classifier(classifier=None, *, providers=None, threads=None):
    """The WBC classifier for the smear task: a folder, ``False`` for none, None for bundled.

    Returns None when no classifier is wanted or none is bundled.
    """
    if classifier is False:
        return None
    from napari_hemato.models.cell_classifier import CellClassifier
    from napari_hemato.models.registry import bundled_models

    if classifier is None and "wbc" not in bundled_models():
        return None
    return CellClassifier(classifier, providers=providers, threads=threads)


def iter_analyze(
    image: str | Path | Slide,
    *,
    task: str = "nuclei",
    model=None,
    classifier=None,
    mpp: float | None = None,
    estimate_mpp: bool = True,
    providers=None,
    threads: int | None = None,
    **engine_options,
) -> Generator[Progress, None, RunResult]:
    """Generator twin of :func:`analyze`: yields :class:`Progress`, returns the result."""
    predictor = load_predictor(task, model, providers=providers, threads=threads)
    wbc = load_classifier(classifier, providers=providers, threads=threads) if task == "smear" else None
    owned = not isinstance(image, Slide)
    opened = open_slide(image, mpp=mpp) if owned else image
    try:
        slide = opened
        if task == "smear" and estimate_mpp and opened.mpp is None:
            slide = with_red_cell_mpp(opened, predictor, roi=engine_options.get("roi"))
        result = yield from iter_run(slide, predictor, **engine_options)
        if wbc is not None and result.status == "complete":
            add_wbc_subtypes(result, slide, wbc)
    finally:
        if owned:
            opened.close()
    return result


def with_red_cell_mpp(slide: Slide, predictor: OnnxPredictor, *, roi=None) -> Slide:
    """``slide`` with the pixel size its red cells show (smear fields that state none).

    Returns ``slide`` itself, unchanged, when the model has no red-cell reference or
    the field has too few red cells; the engine then assumes the model's
    ``assumed_input_mpp``.
    """
    from napari_hemato.core.smear_scale import estimate_smear_mpp

    try:
        est = estimate_smear_mpp(predictor, slide, roi=roi)
    except SlideError as err:
        log.info("%s: %s", slide.path, err)
        return slide
    if est.mpp is None:
        log.warning("%s: too few red cells to measure the pixel size (%d found)", slide.path,
                    est.n_cells)
        return slide
    assumed = predictor.spec.assumed_input_mpp
    if assumed and AGREEMENT[0] <= est.mpp / assumed <= AGREEMENT[1]:
        # the red cells agree with the training images' pixel size, known more precisely
        log.warning("%s: pixel size unknown; its red cells (%.4f µm/px on %d cells) agree with the "
                    "model's training images: %.4f µm/px used", slide.path, est.mpp, est.n_cells,
                    assumed)
        mpp = assumed
    else:
        log.warning("%s: pixel size unknown; %.4f µm/px measured on %d red cells (pass the real one "
                    "to be sure)", slide.path, est.mpp, est.n_cells)
        mpp = est.mpp
    return dataclasses.replace(slide, mpp=mpp, mpp_source="red-cells")


def pixel_size_origin(result: RunResult) -> str:
    """Where a run's pixel size came from: ``"stated"`` (file or user), ``"confirmed"`` (the
    training images' value, which the red cells agreed with), ``"measured"`` (on the red
    cells) or ``"assumed"`` (the image stated none)."""
    if result.grid.mpp_assumed:
        return "assumed"
    if result.store.config["slide"].get("mpp_source") != "red-cells":
        return "stated"
    return "confirmed" if result.grid.mpp0 == result.spec.assumed_input_mpp else "measured"


def add_wbc_subtypes(result: RunResult, slide: Slide, classifier) -> None:
    """Classify the white cells of a finished smear run; rewrites its table."""
    from napari_hemato.core.cells import classify_wbcs

    table = classify_wbcs(result.table(), slide, classifier)
    names = list(result.spec.class_names) + list(classifier.spec.class_names)
    result.store.write_table([table], list(table.columns))
    cfg = result.store.config
    result.store.set_status(
        result.status,
        model={**cfg["model"], "class_names": names},
        classifier={"name": classifier.spec.name, "version": classifier.spec.version},
    )


def analyze(image, *, task: str = "nuclei", **options) -> RunResult:
    """Run a task's model over an image or slide, tiled, and return the result.

    Parameters
    ----------
    image : path or Slide
        Any format :func:`napari_hemato.core.slide.open_slide` reads.
    task : {"nuclei", "smear", "mitosis"}
        Which bundled model to use (or pass ``model=`` a model folder).
    **options
        ``model``, ``classifier`` (smear: WBC classifier folder, False for none,
        default bundled), ``mpp`` (override the pixel size), ``estimate_mpp`` (smear
        fields that state no pixel size: measure it on the red cells, default True;
        else the model's ``assumed_input_mpp``), ``providers``, ``threads``,
        and the engine's options: ``out``, ``roi``, ``tile``, ``batch_size``,
        ``resume``, ``overwrite``, ``scheduler``, ``cancel``.

    Returns
    -------
    RunResult
        ``.table()`` is the per-object table, ``.labels()`` the instance labels.
    """
    return drain(iter_analyze(image, task=task, **options))
