"""H&E nucleus segmentation: the generic task with the bundled nuclei model."""

from __future__ import annotations

from napari_hemato.tasks.base import Task


class NucleiTask(Task):
    name = "nuclei"
    title = "H&E nucleus instance segmentation"
    tissue_default = "auto"  # sections on glass: read only the tiles touching tissue


TASK = NucleiTask()
