"""The task protocol: what makes nuclei, smear or mitosis analysis what it is.

A :class:`Task` holds everything specific to one kind of analysis: its default
model, its pixel-size policy, second stages run on a finished result, its
summary, and hints for review (a CAM for an object, the default queue). The API,
the CLI and the widgets ask the registry (:mod:`napari_hemato.tasks`) for a task
and call these methods; none of them names a class or branches on a task name.

The base class is a complete, generic task: a new task overrides only what
differs (see :mod:`napari_hemato.tasks.nuclei`, the smallest one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from napari_hemato.core.classes import ClassHierarchy
from napari_hemato.core.errors import ModelError


class Task:
    """One kind of analysis. Subclass, set :attr:`name`, override what differs.

    Attributes
    ----------
    name : str
        The task's name on the command line, in the API and in the widgets.
    title : str
        One line for menus and ``--help``.
    model_task : str
        The ``task`` field its models' ``model.json`` must carry (default: ``name``).
    bundled : str
        The folder name of its bundled model under ``models/bundled/`` (default: ``name``).
    """

    name: str = ""
    title: str = ""
    model_task: str | None = None
    bundled: str | None = None
    #: the model a user's corrections of this task fine-tune (``napari-hemato finetune KIND``)
    finetune_kind: str | None = None
    #: several models the corrections can fine-tune: ``{kind: what it refits}``, the first the
    #: default (the Review dock offers the choice); empty: ``finetune_kind`` alone
    finetune_choices: dict[str, str] = {}
    #: a second-stage model the user may choose: ``(api keyword, label)``, e.g. the smear's
    #: ``("classifier", "WBC classifier")``; its fine-tune (``finetune_kind``) replaces it
    stage_model: tuple[str, str] | None = None
    #: ``tissue=`` when the caller gives none: ``"auto"`` (detect the tissue, read only the
    #: tiles touching it: sections on glass) or ``"none"`` (read every tile: a field that
    #: is all specimen, or an image kind the tissue detector does not know)
    tissue_default: str = "none"

    # -- models ---------------------------------------------------------------
    def model_folder(self, model: str | Path | None = None) -> Path:
        """The model folder to use: ``model`` if given, else the task's bundled one."""
        from napari_hemato.models.registry import resolve_model

        return resolve_model(self.bundled or self.name, model)

    def load_predictor(self, model=None, *, providers=None, threads: int | None = None,
                       precision: str | None = None):
        """The ONNX predictor of ``model`` (default: bundled), checked to be for this task."""
        from napari_hemato.models.onnx_backend import OnnxPredictor

        predictor = OnnxPredictor(self.model_folder(model), providers=providers, threads=threads,
                                  precision=precision)
        want = self.model_task or self.name
        if predictor.spec.task != want:
            raise ModelError(
                f"{predictor.spec.folder}: model {predictor.spec.name!r} is for task "
                f"{predictor.spec.task!r}, not {want!r}"
            )
        return predictor

    def load_stages(self, *, providers=None, threads: int | None = None, **options) -> dict:
        """Second-stage models for :meth:`finish` (none by default)."""
        return {}

    def suits(self, info: dict) -> bool:
        """Whether this task is the one to offer for an image (``info``: a slide's
        :meth:`~napari_hemato.core.slide.Slide.info`). Default: no."""
        return False

    # -- running ----------------------------------------------------------------
    def prepare_slide(self, slide, predictor, *, roi=None, estimate_mpp: bool = True,
                      pooled_mpp: float | None = None):
        """The slide as the run should see it (the pixel-size policy). Default: unchanged.

        A slide without a pixel size is then analysed at the model's
        ``assumed_input_mpp`` (flagged in the result). ``pooled_mpp``: the pixel size
        :meth:`pool_pixel_sizes` measured for images like this one."""
        return slide

    def find_tissue(self, slide, *, roi=None):
        """What ``tissue="auto"`` reads of ``slide``: a
        :class:`~napari_hemato.core.tissue.TissueMask`, or None for all of it. Default: the
        H&E tissue (:func:`~napari_hemato.core.tissue.detect_tissue`)."""
        from napari_hemato.core.tissue import detect_tissue

        return detect_tissue(slide, roi=roi)

    def pool_pixel_sizes(self, paths, predictor) -> dict[tuple[int, int], float]:
        """Pixel sizes measured once for many images that state none, by image size
        (``analyze FOLDER``). Default: none (each image follows :meth:`prepare_slide`)."""
        return {}

    def finish(self, result, slide, stages: dict) -> None:
        """Second stages on a complete result (rewrite its table in place). Default: none."""

    # -- summaries ----------------------------------------------------------------
    def summary(self, table: pd.DataFrame, *, area_mm2: float | None = None,
                mpp: float | None = None, region=None) -> dict[str, Any]:
        """Task-specific numbers from an object table (JSON-able). Default: none.

        ``area_mm2`` is the area analysed (rates are over it: the tissue area in the region
        when the run had a tissue mask), ``region`` its level-0 box."""
        return {}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """:meth:`summary` as plain text lines, for the CLI and the review panel."""
        return []

    # -- review hints ---------------------------------------------------------------
    def hierarchy(self, annotations) -> ClassHierarchy:
        """The classes of this task's objects, by level (review, hotkeys, summaries, exports).

        Default: one level, the annotation set's class names."""
        return ClassHierarchy.flat(annotations.class_names)

    def claims(self, annotations) -> bool:
        """Whether objects saved without their model's task (older files) are this task's."""
        return False

    def has_cam(self, row: pd.Series) -> bool:
        """Whether :meth:`cam` can explain this object."""
        return False

    def cam(self, annotations, row: pd.Series):
        """``(crop, cam)``: what the classifier saw and where it looked (when :meth:`has_cam`)."""
        raise NotImplementedError(f"task {self.name!r} has no class activation maps")

    # -- fine-tuning --------------------------------------------------------------
    def finetune_kinds(self) -> dict[str, str]:
        """``{kind: what it refits}`` of the fine-tunes this task's corrections feed."""
        if self.finetune_choices:
            return dict(self.finetune_choices)
        return {self.finetune_kind: self.finetune_kind} if self.finetune_kind else {}

    def finetune_replaces_stage(self, kind: str) -> bool:
        """Whether the ``kind`` fine-tune replaces the second-stage model (:attr:`stage_model`)
        rather than the task's own model."""
        return bool(self.stage_model) and kind == self.finetune_kind

    def export_corrections(self, annotations, folder: Path, kind: str | None = None) -> Path:
        """Write ``annotations`` as what ``finetune(kind or self.finetune_kind, ...)`` reads."""
        raise NotImplementedError(f"task {self.name!r} has no fine-tuning from corrections yet")

    @staticmethod
    def export_reviewed_masks(annotations, folder: Path) -> Path:
        """``<image>_labels.tif`` + CSV (the label TIFF export: the image path, origin and pixel
        size ride in its metadata) in ``folder``: what ``finetune nuclei|smear`` reads. The
        layer's region is taken as reviewed; on a whole slide that is an "Edit here" window (the
        whole-slide layer's masks stay in its run's store). Returns the TIFF."""
        from napari_hemato.core.errors import HematoError
        from napari_hemato.core.export import export_tiff
        from napari_hemato.core.export.formats import safe_name

        if annotations.labels is None:
            raise HematoError("a whole-slide layer's masks stay in its run's store: open 'Edit here' "
                              "on a region, correct it, and fine-tune from that window (the region "
                              "you reviewed)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = safe_name(Path(annotations.image_path).stem if annotations.image_path else "corrections")
        return export_tiff(annotations, folder / f"{name}_labels.tif", overwrite=True)

    def __repr__(self) -> str:
        return f"<Task {self.name!r}>"
