"""Python API: analyse an image or slide with a task's model, headless.

Examples
--------
>>> import napari_hemato as nh                                  # doctest: +SKIP
>>> result = nh.analyze("slide.svs", task="nuclei", out="slide.hemato.zarr")
>>> result.table()["class"].value_counts()
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from napari_hemato.core.engine import Progress, RunResult, drain, iter_run
from napari_hemato.core.errors import ModelError
from napari_hemato.core.slide import Slide, open_slide
from napari_hemato.models.onnx_backend import OnnxPredictor
from napari_hemato.models.registry import resolve_model

TASKS = ("nuclei", "smear", "mitosis")


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
    providers=None,
    threads: int | None = None,
    **engine_options,
) -> Generator[Progress, None, RunResult]:
    """Generator twin of :func:`analyze`: yields :class:`Progress`, returns the result."""
    predictor = load_predictor(task, model, providers=providers, threads=threads)
    wbc = load_classifier(classifier, providers=providers, threads=threads) if task == "smear" else None
    owned = not isinstance(image, Slide)
    slide = open_slide(image, mpp=mpp) if owned else image
    try:
        result = yield from iter_run(slide, predictor, **engine_options)
        if wbc is not None and result.status == "complete":
            add_wbc_subtypes(result, slide, wbc)
    finally:
        if owned:
            slide.close()
    return result


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
        default bundled), ``mpp`` (override the pixel size), ``providers``, ``threads``,
        and the engine's options: ``out``, ``roi``, ``tile``, ``batch_size``,
        ``resume``, ``overwrite``, ``scheduler``, ``cancel``.

    Returns
    -------
    RunResult
        ``.table()`` is the per-object table, ``.labels()`` the instance labels.
    """
    return drain(iter_analyze(image, task=task, **options))
