"""Analyse dock widget: pick image, task, model, pixel size and region; run in a worker.

Thin: it collects parameters and calls :func:`napari_hemato.api.iter_analyze`
in a napari thread worker. Progress shows in the activity dock; Cancel stops
within about a second (the ONNX run is terminated); finished tiles stay on disk
and Resume continues the same run. Finished tiles appear as a preview layer
while the run goes on; results become new layers (never replacing existing
ones) and are autosaved next to the image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import napari
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QSizePolicy

from napari_hemato._widgets.serial import SerialHandlers
from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError
from napari_hemato.io import point_lod
from napari_hemato.io.layers import KEY
from napari_hemato.io.viewer import (
    image_info,
    in_image_world,
    layer_mpp,
    preview_layer_data,
    result_layer_data,
    run_store_path,
    shape_rois,
    slide_for_layer,
    view_roi,
)
from napari_hemato.tasks import DEFAULT_TASK, get_task, suggest_task, task_names

log = logging.getLogger(__name__)
REGIONS = ("whole image", "current view", "drawn shapes")
#: the tissue choices and what iter_analyze gets for them (None: the task's default)
TISSUE = {"task default": None, "detect": "auto", "whole image": "none", "mask layer": "layer"}


class AnalyzeWidget(Container):
    """Run a task's model over an image layer (multiscale slides included)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        point_lod.install(viewer)
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.task = ComboBox(choices=task_names(), value=DEFAULT_TASK, label="task",
                             tooltip="offered from the image: smear for a camera field "
                                     "(JPEG/PNG without pixel size), else nuclei")
        self.model = LineEdit(value="", label="model folder",
                              tooltip="empty: the bundled model of the task")
        self.stage_model = LineEdit(value="", label="second model",
                                    tooltip="the task's second-stage model folder; empty: the "
                                            "bundled one")
        self.mpp = FloatSpinBox(value=0.0, min=0.0, max=100.0, step=0.001, label="µm/px",
                                tooltip="pixel size of level 0; 0 = unknown (the model's is assumed)")
        self.region = ComboBox(choices=REGIONS, value=REGIONS[0], label="region")
        self.shapes = create_widget(annotation=napari.layers.Shapes, label="shapes",
                                    options={"nullable": True})
        self.tissue = ComboBox(choices=list(TISSUE), value="task default", label="tissue",
                               tooltip="which tiles are read: the task's default (H&E: detect the "
                                       "tissue; smear: the reading zone of a scan, a camera field "
                                       "whole), detect, every tile, or a mask layer (Show tissue "
                                       "makes one you can paint)")
        self.tissue_layer = create_widget(annotation=napari.layers.Labels, label="mask layer",
                                          options={"nullable": True})
        self.show_tissue = PushButton(text="Show tissue")
        self.tile = SpinBox(value=0, min=0, max=8192, step=64, label="tile px",
                            tooltip="tile core in model pixels; 0 = the model's default")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.resume_button = PushButton(text="Resume", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="tiles")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # a long status wraps; the dock keeps its width
        self.status.native.setSizePolicy(QSizePolicy.Policy.Ignored,
                                         QSizePolicy.Policy.Preferred)
        self.extend([self.image, self.task, self.model, self.stage_model, self.mpp, self.region,
                     self.shapes, self.tissue, self.tissue_layer, self.show_tissue, self.tile,
                     self.run_button, self.cancel_button, self.resume_button, self.progress,
                     self.status])
        self.image.changed.connect(self._on_image)
        self.task.changed.connect(self._on_task)
        self.tissue.changed.connect(self._on_tissue)
        self.show_tissue.changed.connect(lambda: self.add_tissue_layer())
        self.run_button.changed.connect(lambda: self.start())
        self.cancel_button.changed.connect(self.cancel)
        self.resume_button.changed.connect(lambda: self.start(resume=True))
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._refresh_choices)
        self.worker = None
        self._token: CancelToken | None = None
        self._pbar = None
        self._preview = None
        self._last: dict | None = None
        self.results: list = []
        self._on_image()
        self._on_task()
        self._on_tissue()

    # -- parameters -----------------------------------------------------------
    def _refresh_choices(self, event=None) -> None:
        self.image.reset_choices()
        self.shapes.reset_choices()
        self.tissue_layer.reset_choices()

    def _on_tissue(self, *_) -> None:
        self.tissue_layer.visible = self.tissue.value == "mask layer"

    def add_tissue_layer(self):
        """Detect the tissue of the image and show it as a Labels layer to paint or erase;
        the next run uses it ("mask layer"). Returns the layer (None without an image)."""
        from napari_hemato.io.viewer import tissue_layer_data

        layer = self.image.value
        if layer is None:
            show_error("napari-hemato: open an image first")
            return None
        try:
            task = get_task(self.task.value)
            mask = task.find_tissue(slide_for_layer(layer, mpp=self.mpp.value or None))
        except HematoError as err:
            show_error(f"napari-hemato: {err}")
            return None
        if mask is None:  # a smear's camera field: there is nothing to leave out
            self.status.value = "a single field: the whole image is read"
            return None
        data, kwargs, _ = tissue_layer_data(mask, layer, name=f"{layer.name} tissue")
        added = self._viewer.add_labels(data, **kwargs)
        self.tissue_layer.reset_choices()
        self.tissue.value, self.tissue_layer.value = "mask layer", added
        area = "" if mask.area_mm2 is None else f" ({mask.area_mm2:.3g} mm²)"
        self.status.value = f"tissue{area}: paint or erase it, then Run"
        return added

    def _tissue_option(self) -> dict:
        """iter_analyze's ``tissue`` keyword for the choice (none: the task's default)."""
        import numpy as np

        choice = TISSUE[self.tissue.value]
        if choice is None:
            return {}
        if choice != "layer":
            return {"tissue": choice}
        mask = self.tissue_layer.value
        if mask is None:
            raise HematoError("choose the tissue mask layer (or press Show tissue)")
        return {"tissue": np.asarray(mask.data) != 0}

    def _on_image(self, *_) -> None:
        layer = self.image.value
        if layer is not None:
            self.mpp.value = layer_mpp(layer) or 0.0
            self.task.value = suggest_task(image_info(layer))

    def _on_task(self, *_) -> None:
        """Offer the second-model field only for a task that has one, named by the task."""
        stage = get_task(self.task.value).stage_model
        self.stage_model.visible = stage is not None
        if stage is not None:
            self.stage_model.label = stage[1]

    def _stage_options(self) -> dict:
        stage = get_task(self.task.value).stage_model
        folder = self.stage_model.value.strip()
        return {stage[0]: folder} if stage is not None and folder else {}

    def _rois(self, layer) -> list:
        mode = self.region.value
        if mode == "current view":
            roi = view_roi(layer, self._viewer)
            if roi is None:
                raise HematoError("the image is not in view: pan to it, or choose 'whole image'")
            return [roi]
        if mode == "drawn shapes":
            shapes = self.shapes.value
            if shapes is None or not len(shapes.data):
                raise HematoError("draw one or more shapes (rectangles or polygons) first")
            return shape_rois(shapes, layer)
        return [None]

    # -- running ----------------------------------------------------------------
    def start(self, *, resume: bool = False) -> None:
        """Start (or resume) a run in a worker thread."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return
        layer = self.image.value
        if layer is None:
            show_error("napari-hemato: open an image first")
            return
        try:
            if resume and self._last:
                params = self._last
            else:
                slide = slide_for_layer(layer, mpp=self.mpp.value or None)
                params = {
                    "layer": layer, "slide": slide, "task": self.task.value,
                    "model": self.model.value.strip() or None, "tile": self.tile.value or None,
                    "rois": self._rois(layer), "stage": self._stage_options(),
                    "tissue": self._tissue_option(),
                }
                params["outs"] = [run_store_path(layer.metadata.get(KEY, {}).get("path"), params["task"])
                                  for _ in params["rois"]]
        except HematoError as err:
            show_error(f"napari-hemato: {err}")
            return
        self._last = params
        self._token = CancelToken()
        self.worker = create_worker(self._job, params, resume, self._token)
        serial = SerialHandlers()  # handlers never nest (see _widgets/serial.py)
        self.worker.yielded.connect(serial.wrap(lambda: self._on_progress))
        self.worker.returned.connect(serial.wrap(lambda: self._on_done))
        self.worker.errored.connect(serial.wrap(lambda: self._on_error))
        self.worker.finished.connect(serial.wrap(lambda: self._on_finished))
        self.run_button.enabled = self.resume_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.min, self.progress.max, self.progress.value = 0, 0, 0  # busy, not last run's 100 %
        self.status.value = "starting…"
        self.worker.start()

    @staticmethod
    def _job(params: dict, resume: bool, token: CancelToken):
        from napari_hemato.api import iter_analyze

        results = []
        for k, (roi, out) in enumerate(zip(params["rois"], params["outs"], strict=True)):
            gen = iter_analyze(params["slide"], task=params["task"], model=params["model"],
                               out=out, roi=roi, tile=params["tile"],
                               resume=resume and Path(out).exists(), cancel=token, phases=True,
                               **params["stage"], **params["tissue"])
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    results.append(stop.value)
                    break
                yield (k, len(params["rois"]), out, event)
            if token.cancelled:
                break
        return results

    def cancel(self) -> None:
        """Stop the run within about a second; finished tiles are kept."""
        if self._token is not None:
            self._token.cancel()  # the engine returns a 'cancelled' result at once
        self.status.value = "cancelling…"

    def _on_progress(self, item) -> None:
        from napari_hemato.api import Phase

        k, n_rois, _out, event = item
        if isinstance(event, Phase):  # before the first tile: say what takes the time
            self.progress.max = 0  # busy indicator
            self.status.value = f"region {k + 1}/{n_rois}: {event.name}…"
            return
        if self._pbar is None:
            self._pbar = napari_progress(total=event.total * n_rois, desc=f"napari-hemato {self._last['task']}")
        self._pbar.n = k * event.total + event.done
        self._pbar.refresh()
        self.progress.max = event.total
        self.progress.value = event.done
        self.status.value = f"region {k + 1}/{n_rois}: {event.done}/{event.total} tiles, {event.n_objects} objects"
        self._show_preview(event)

    def _show_preview(self, event) -> None:
        if event.run is None:
            return
        if self._preview is not None and self._preview in self._viewer.layers:
            if self._preview.metadata[KEY]["result"] == str(event.run.path):
                self._preview.refresh()
                return
            self._remove_preview()  # the next region of a multi-region run
        preview = preview_layer_data(event.run, self._last["layer"],
                                     name=f"{self._last['task']} (running)")
        if preview is not None:
            data, kwargs = preview
            self._preview = self._viewer.add_labels(data, **kwargs)

    def _on_done(self, results) -> None:
        self.results = results
        params = self._last
        for k, result in enumerate(results):
            if result.status != "complete":
                self.status.value = f"cancelled after {result.n_done}/{len(result.plan)} tiles: Resume continues"
                self.resume_button.enabled = True
                show_info(f"napari-hemato: run cancelled; {result.n_done} tiles kept in {result.path}")
                return
            suffix = f" region {k + 1}" if len(results) > 1 else ""
            name = f"{params['layer'].name} {params['task']}{suffix}"
            for data, kwargs, kind in result_layer_data(result, name=name):
                mpp0 = None if result.grid.mpp_assumed else result.grid.mpp0
                kwargs = in_image_world(kwargs, params["layer"], mpp0)
                layer = napari.layers.Layer.create(data, kwargs, kind)
                point_lod.prepare(self._viewer, layer)  # a million points: drawn thinned
                layer = self._viewer.add_layer(layer)
                layer.metadata[KEY]["sidecar_name"] = layer.name
                if layer.metadata[KEY].get("lazy"):
                    layer.editable = False  # whole-slide labels: classes are reviewed, masks read-only
                self._autosave(layer)
        self._remove_preview()
        params["slide"].close()
        n = sum(r.n_objects for r in results)
        self.status.value = f"done: {n} objects" + _pixel_size_note(results)
        self._last = None

    def _autosave(self, layer) -> None:
        from napari_hemato.core.sidecar import REVISION, autosave
        from napari_hemato.io.layers import annotations_from_layer

        ann = annotations_from_layer(layer)
        saved = autosave(ann, layer.name)
        if saved is not None:  # the revision is the base of the Review widget's saves of this layer
            layer.metadata[KEY].update({REVISION: ann.metadata[REVISION], "sidecar_name": saved.name})

    def _remove_preview(self) -> None:
        if self._preview is not None and self._preview in self._viewer.layers:
            self._viewer.layers.remove(self._preview)
        self._preview = None

    def _on_error(self, err: Exception) -> None:
        show_error(f"napari-hemato: {err}")
        self.status.value = f"error: {err}"

    def _on_finished(self) -> None:
        self.worker = None
        self._token = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self._last is not None:
            self.resume_button.enabled = True


def _pixel_size_note(results) -> str:
    """How the pixel size of a run was chosen, when the image stated none."""
    from napari_hemato.api import pixel_size_origin

    if not results:
        return ""
    mpp = results[0].grid.mpp0
    return {
        "confirmed": f" (pixel size {mpp:.3g} µm/px, the training images', confirmed by the red cells)",
        "measured": f" (pixel size {mpp:.3g} µm/px, measured on the red cells)",
        "assumed": f" (pixel size unknown: {mpp:.3g} µm/px assumed)",
    }.get(pixel_size_origin(results[0]), "")
