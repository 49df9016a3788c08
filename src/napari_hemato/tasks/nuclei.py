"""H&E nucleus segmentation: the generic task with the bundled nuclei model."""

from __future__ import annotations

from napari_hemato.tasks.base import Task


class NucleiTask(Task):
    name = "nuclei"
    title = "H&E nucleus instance segmentation"
    tissue_default = "auto"  # sections on glass: read only the tiles touching tissue
    finetune_kind = "nuclei"  # corrected masks refit the foreground and distance maps' last layer

    def export_corrections(self, annotations, folder):
        """``<image>_labels.tif`` + CSV (the label TIFF export: the image path, origin and pixel
        size ride in its metadata) in ``folder``: what ``finetune nuclei`` reads. The layer's
        region is taken as reviewed; on a whole slide that is an "Edit here" window (the
        whole-slide layer's masks stay in its run's store). Returns the TIFF."""
        from pathlib import Path

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


TASK = NucleiTask()
