"""H&E nucleus segmentation: the generic task with the bundled nuclei model."""

from __future__ import annotations

from napari_hemato.tasks.base import Task


class NucleiTask(Task):
    name = "nuclei"
    title = "H&E nucleus instance segmentation"
    tissue_default = "auto"  # sections on glass: read only the tiles touching tissue
    finetune_kind = "nuclei"  # corrected masks refit the foreground and distance maps' last layer

    def export_corrections(self, annotations, folder, kind=None):
        """The reviewed masks as a label TIFF (:meth:`Task.export_reviewed_masks`): what
        ``finetune nuclei`` reads."""
        return self.export_reviewed_masks(annotations, folder)


TASK = NucleiTask()
