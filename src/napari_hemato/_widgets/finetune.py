""""Fine-tune on my corrections": the Review dock's panel (thin: the work is in the core).

The reviewed layer's corrections are exported as the task's fine-tuning data
(:meth:`Task.export_corrections`), :func:`napari_hemato.api.finetune` refits the model in
a worker (progress, cancel: nothing is written), and the new model folder (next to the
image, ``<image>.hemato/finetuned-models/``) is set in the Analyse dock, so the next run of the
current view, a region or the image uses it. Corrected layers are kept: a run adds layers.
When a task's corrections feed several models (a smear's white-cell classes or its cells:
:attr:`Task.finetune_choices`), the panel offers the choice.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime
from pathlib import Path

from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_hemato._widgets.serial import SerialHandlers
from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError
from napari_hemato.tasks import task_for

log = logging.getLogger(__name__)


def _relay(call, token: CancelToken):
    """Run ``call(progress)`` in a thread; yield its ``(step, fraction)`` reports; return its result."""
    from napari_hemato.finetune.common import Progress

    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call(Progress(lambda step, f: events.put((step, f)), token))
        except BaseException as err:  # noqa: BLE001 - re-raised in the worker below
            outcome["error"] = err
        finally:
            events.put(None)

    thread = threading.Thread(target=run, name="napari-hemato finetune", daemon=True)
    thread.start()
    while (item := events.get()) is not None:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class FinetunePanel(QWidget):
    """Button, progress and cancel of a fine-tune from the reviewed layer's corrections."""

    def __init__(self, viewer, get_annotations) -> None:
        super().__init__()
        self.viewer = viewer
        self._get_annotations = get_annotations
        self.worker = None
        self._token: CancelToken | None = None
        self._task = self._kind = None
        self.result = None
        self.button = QPushButton("Fine-tune on my corrections")
        self.button.setToolTip("refit the model on this layer's reviewed objects (minutes, no "
                               "torch); the Analyse dock then runs with the new model")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.rerun_button = QPushButton("Run the new model")
        self.rerun_button.setToolTip("run the Analyse dock (its region: whole image, current view "
                                     "or drawn shapes) with the fine-tuned model; corrected layers "
                                     "are kept, the run adds new ones")
        self.rerun_button.setEnabled(False)
        self.kind_box = QComboBox()  # what to refit, when the task's corrections feed several models
        self.kind_box.setToolTip("the model this layer's corrections refit")
        self.kind_box.setVisible(False)
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.button)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.kind_box)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.rerun_button)
        self.button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.rerun_button.clicked.connect(self.rerun)

    def set_task(self, task) -> None:
        """Offer the models ``task``'s corrections can refit (the choice shows when there are
        several: a smear's white-cell classes or its cells)."""
        kinds = task.finetune_kinds()
        if [self.kind_box.itemData(i) for i in range(self.kind_box.count())] != list(kinds):
            self.kind_box.clear()
            for kind, label in kinds.items():
                self.kind_box.addItem(f"refit: {label}", kind)
        self.kind_box.setVisible(len(kinds) > 1)

    def kind(self, task) -> str | None:
        """The fine-tune chosen for ``task`` (its default when the choice is not its)."""
        chosen = self.kind_box.currentData()
        return chosen if chosen in task.finetune_kinds() else task.finetune_kind

    def start(self) -> None:
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return
        ann = self._get_annotations()
        if ann is None:
            self.status.setText("choose a layer made by napari-hemato first")
            return
        task = task_for(ann)
        kind = self.kind(task)
        if not kind:
            self.status.setText(f"{task.name}: no fine-tuning from corrections yet")
            return
        if not ann.image_path:
            self.status.setText("the layer's image file is unknown: its crops cannot be exported")
            return
        from napari_hemato.core.sidecar import sidecar_dir

        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        home = sidecar_dir(ann.image_path, create=True) / "finetuned-models"
        data, out = home / f".corrections-{stamp}", home / f"{kind}-{stamp}"
        self._token = CancelToken()
        self._task, self._kind = task, kind
        base = current_model(self.viewer, task, kind)
        # errors are this panel's to show (status line; a notification when unexpected)
        self.worker = create_worker(self._job, task, kind, ann, data, out, base, self._token,
                                    _ignore_errors=True)
        serial = SerialHandlers()
        self.worker.yielded.connect(serial.wrap(lambda: self._on_progress))
        self.worker.returned.connect(serial.wrap(lambda: self._on_done))
        self.worker.errored.connect(serial.wrap(lambda: self._on_error))
        self.worker.finished.connect(serial.wrap(lambda: self._on_finished))
        self.button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setValue(0)
        self.status.setText("exporting the corrections…")
        self.worker.start()

    @staticmethod
    def _job(task, kind: str, ann, data: Path, out: Path, base, token: CancelToken):
        import shutil

        from napari_hemato.api import finetune

        try:
            task.export_corrections(ann, data, kind=kind)
            result = yield from _relay(lambda progress: finetune(kind, [data], out,
                                                                 base=base, progress=progress), token)
        finally:
            shutil.rmtree(data, ignore_errors=True)
        return result

    def rerun(self) -> None:
        """Start the Analyse dock's run (the fine-tuned model is in its field)."""
        widget = analyze_widget(self.viewer)
        if widget is None:
            self.status.setText("open the Analyse dock (Plugins → napari-hemato) to run the new model")
            return
        widget.start()

    def cancel(self) -> None:
        if self._token is not None:
            self._token.cancel()
            self.status.setText("cancelling…")

    def _on_progress(self, item) -> None:
        step, fraction = item
        self.bar.setValue(int(round(100 * fraction)))
        self.status.setText(f"{step}…")

    def _on_done(self, result) -> None:
        self.result = result
        where = offer_model(self.viewer, result.folder, self._task, self._get_annotations(), self._kind)
        self.rerun_button.setEnabled(where is not None)
        line = f"new model: {result.folder.name} ({_headline(result.metrics)}); "
        self.status.setText(line + (f"set in the Analyse dock's {where}: 'Run the new model' uses it"
                                    if where else f"use it as the model folder: {result.folder}"))

    def _on_error(self, err: Exception) -> None:
        from napari_hemato.finetune.common import FinetuneCancelled

        if isinstance(err, FinetuneCancelled):
            self.status.setText("cancelled: no model was written")
        elif isinstance(err, (HematoError, ValueError, OSError)):
            self.status.setText(f"fine-tune failed: {err}")
        else:
            from napari.utils.notifications import show_error

            log.error("fine-tune failed", exc_info=(type(err), err, err.__traceback__))
            show_error(f"napari-hemato: fine-tune failed: {type(err).__name__}: {err}")
            self.status.setText(f"fine-tune failed: {type(err).__name__}: {err}")

    def _on_finished(self) -> None:
        self.worker = None
        self._token = None
        self.button.setEnabled(True)
        self.cancel_button.setEnabled(False)


def _headline(metrics: dict) -> str:
    """The fine-tune's one-line result: its ``headline``, else the reference before → after."""
    if metrics.get("headline"):
        return metrics["headline"]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    key = next((k for k in ("reference_accuracy", "reference_recall") if k in before), None)
    if key is None:
        return "see its model card"
    return f"{key.replace('_', ' ')} {before[key]:.3f} → {after.get(key, float('nan')):.3f}"


def analyze_widget(viewer):
    """The Analyse dock's widget, when it is open."""
    from napari_hemato._widgets.analyze import AnalyzeWidget

    docks = getattr(getattr(viewer, "window", None), "dock_widgets", {}) or {}
    for dock in list(docks.values()):
        widget = dock if isinstance(dock, AnalyzeWidget) else getattr(dock, "_magic_widget", None)
        if isinstance(widget, AnalyzeWidget):
            return widget
    return None


def current_model(viewer, task, kind: str | None = None) -> str | None:
    """The model a fine-tune (``kind``, default the task's) of ``task`` starts from: the Analyse
    dock's choice, else bundled."""
    widget = analyze_widget(viewer)
    if widget is None or widget.task.value != task.name:
        return None
    field = widget.stage_model if task.finetune_replaces_stage(kind or task.finetune_kind) else widget.model
    return field.value.strip() or None


def offer_model(viewer, folder: Path, task, ann=None, kind: str | None = None) -> str | None:
    """Put ``folder`` in the Analyse dock's field that the fine-tuned model replaces (and
    the reviewed layer's image in its image field)."""
    from napari_hemato.io.layers import KEY

    widget = analyze_widget(viewer)
    if widget is None:
        return None
    path = getattr(ann, "image_path", None)
    for layer in widget.image.choices if path else ():
        own = layer.metadata.get(KEY, {}).get("path")
        if own and Path(own).resolve() == Path(path).resolve():
            widget.image.value = layer
            break
    widget.task.value = task.name
    if task.finetune_replaces_stage(kind or task.finetune_kind):
        widget.stage_model.value = str(folder)
        return task.stage_model[1]
    widget.model.value = str(folder)
    return "model folder"
