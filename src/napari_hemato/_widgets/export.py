"""Export dock widget: corrected objects -> training data and exchange formats.

Thin: it builds the annotation set of the chosen layer (with every correction)
and calls :func:`napari_hemato.core.export.formats.export_annotations`. Each file is
written under a temporary name and renamed; bad destinations are refused with
a message and nothing partial is left.
"""

from __future__ import annotations

from pathlib import Path

import napari
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from napari.utils.notifications import show_error, show_info

from napari_hemato.core.errors import HematoError
from napari_hemato.core.export.formats import FORMATS, destinations, export_annotations, formats_for
from napari_hemato.io.layers import KEY, annotations_from_layer


def _ours(viewer) -> list:
    return [layer for layer in viewer.layers
            if layer.metadata.get(KEY, {}).get("role") in ("instances", "points")]


class ExportWidget(Container):
    """Export a napari-hemato layer in the formats training code and other tools read."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self.layer = ComboBox(choices=self._layer_choices, label="layer")
        self.folder = FileEdit(mode="d", label="folder", value=Path.home())
        self.checks = {name: CheckBox(value=name in ("crops", "geojson"), text=f.description)
                       for name, f in FORMATS.items()}
        self.only_reviewed = CheckBox(value=False, text="only reviewed objects")
        self.overwrite = CheckBox(value=False, text="overwrite existing files")
        self.button = PushButton(text="Export")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # long paths wrap, the dock keeps its width
        self.extend([self.layer, self.folder, *self.checks.values(), self.only_reviewed,
                     self.overwrite, self.button, self.status])
        self.button.changed.connect(self.export)
        self.layer.changed.connect(self._on_layer)
        viewer.layers.events.inserted.connect(lambda e: self.layer.reset_choices())
        viewer.layers.events.removed.connect(lambda e: self.layer.reset_choices())
        self._on_layer()

    def _layer_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in _ours(self._viewer)]

    def _on_layer(self, *_) -> None:
        layer = self.layer.value
        kind = layer.metadata[KEY]["kind"] if layer is not None else None
        for name, box in self.checks.items():
            box.enabled = kind is not None and name in formats_for(kind)

    def export(self) -> dict:
        """Write the checked formats; returns ``{format: path}``."""
        layer = self.layer.value
        if layer is None:
            show_error("napari-hemato: no napari-hemato layer to export")
            return {}
        ann = annotations_from_layer(layer)
        formats = [n for n, box in self.checks.items() if box.value and box.enabled]
        folder = Path(self.folder.value)
        existing = [p for p in destinations(folder, formats, name=layer.name).values() if p.exists()]
        if existing and not self.overwrite.value:
            names = ", ".join(p.name for p in existing)
            self.status.value = (f"not exported: {names} already exist in {folder}. Tick "
                                 "'overwrite existing files' to replace them, or choose another folder.")
            show_error("napari-hemato: export files already exist; tick 'overwrite existing files' "
                       "(details in the Export panel)")
            return {}
        try:
            written = export_annotations(ann, Path(self.folder.value), formats, name=layer.name,
                                         overwrite=self.overwrite.value,
                                         only_reviewed=self.only_reviewed.value)
        except (HematoError, OSError, ValueError) as err:
            show_error("napari-hemato: export failed, nothing written for the failing format "
                       "(details in the Export panel)")
            self.status.value = f"failed: {err}"
            return {}
        self.status.value = (f"wrote {', '.join(p.name for p in written.values())} "
                             f"to {self.folder.value}")
        show_info(f"napari-hemato: exported {len(written)} file(s) (see the Export panel)")
        return written
