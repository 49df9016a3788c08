"""The Review dock's Qt layout (widgets only; behaviour is in :mod:`.review`)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_hemato._widgets.finetune import FinetunePanel
from napari_hemato._widgets.prob_bars import ProbabilityBars


def build_panel(w) -> None:
    """Create the Review dock's controls on ``w`` (a ReviewWidget) and wire them to it.

    The controls sit in a scroll area, so the dock never asks for more height than a
    1000 px screen has next to the other docks; long texts wrap instead of widening it."""
    outer = QVBoxLayout(w)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = QWidget()
    scroll.setWidget(body)
    outer.addWidget(scroll)
    root = QVBoxLayout(body)
    w.layer_box = QComboBox()
    w.layer_box.currentIndexChanged.connect(w._on_layer_choice)
    root.addWidget(w.layer_box)
    w.info = QLabel("click an object")
    w.info.setWordWrap(True)
    w.info.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    root.addWidget(w.info)
    w.bars = ProbabilityBars()
    root.addWidget(w.bars)
    w.cam = QLabel()
    root.addWidget(w.cam)
    w.cam_caption = QLabel("")
    w.cam_caption.setWordWrap(True)
    w.cam_caption.setVisible(False)
    root.addWidget(w.cam_caption)
    row = QHBoxLayout()
    w.class_box = QComboBox()
    w.set_class_button = QPushButton("Set class")
    w.set_class_button.clicked.connect(
        lambda: w.set_class(w.class_box.currentData() or w.class_box.currentText()))
    w.reviewed_button = QPushButton("Reviewed (Alt-R)")
    w.reviewed_button.clicked.connect(w.mark_reviewed)
    for c in (w.class_box, w.set_class_button, w.reviewed_button):
        row.addWidget(c)
    root.addLayout(row)

    queue = QGroupBox("Review queue")
    grid = QGridLayout(queue)
    w.queue_mode = QComboBox()
    w.queue_mode.currentIndexChanged.connect(lambda _: w.build_queue())
    w.prev_button, w.next_button = QPushButton("◀ Prev (Alt-P)"), QPushButton("Next (Alt-N) ▶")
    w.prev_button.clicked.connect(w.previous)
    w.next_button.clicked.connect(w.next)
    w.undo_button = QPushButton("Undo (Alt-Z)")
    w.undo_button.clicked.connect(w.undo)
    w.redo_button = QPushButton("Redo (Alt-Y)")
    w.redo_button.clicked.connect(w.redo)
    w.progress_label = QLabel("")
    grid.addWidget(w.queue_mode, 0, 0, 1, 2)
    grid.addWidget(w.prev_button, 1, 0)
    grid.addWidget(w.next_button, 1, 1)
    grid.addWidget(w.undo_button, 2, 0)
    grid.addWidget(w.redo_button, 2, 1)
    grid.addWidget(w.progress_label, 3, 0, 1, 2)
    root.addWidget(queue)

    edit = QGroupBox("Edit objects")
    grid = QGridLayout(edit)
    w.merge_with = QSpinBox()
    w.merge_with.setRange(0, 2**31 - 1)
    w.merge_with.setPrefix("with id ")
    w.merge_button = QPushButton("Merge")
    w.merge_button.clicked.connect(w.merge)
    w.split_button = QPushButton("Split")
    w.split_button.clicked.connect(w.split)
    w.delete_button = QPushButton("Delete")
    w.delete_button.clicked.connect(w.delete)
    w.accept_button, w.reject_button = QPushButton("Accept"), QPushButton("Reject")
    w.accept_button.clicked.connect(w.accept)
    w.reject_button.clicked.connect(w.reject)
    w.edit_here_button = QPushButton("Edit here")
    w.edit_here_button.setToolTip("masks of a whole-slide layer: edit the view in memory")
    w.edit_here_button.clicked.connect(w.edit_here)
    w.save_window_button = QPushButton("Save into slide")
    w.save_window_button.setToolTip("write this edit window back into its whole-slide result")
    w.save_window_button.clicked.connect(w.save_window)
    for i, c in enumerate((w.merge_button, w.merge_with, w.split_button,
                           w.delete_button, w.accept_button, w.reject_button,
                           w.edit_here_button, w.save_window_button)):
        grid.addWidget(c, i // 2, i % 2)
    root.addWidget(edit)

    w.summary = QLabel("")
    w.summary.setWordWrap(True)
    w.summary.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    root.addWidget(w.summary)
    w.hotspot_button = QPushButton("Jump to mitotic hotspot")
    w.hotspot_button.clicked.connect(w.jump_to_hotspot)
    root.addWidget(w.hotspot_button)

    model = QGroupBox("Model")
    box = QVBoxLayout(model)
    w.finetune = FinetunePanel(w.viewer, lambda: w.session.to_annotations() if w.session else None)
    box.addWidget(w.finetune)
    root.addWidget(model)
    root.addStretch()
    # no horizontal scrolling: the dock is at least as wide as its widest row of buttons
    scroll.setMinimumWidth(body.minimumSizeHint().width()
                           + scroll.verticalScrollBar().sizeHint().width() + 4)
