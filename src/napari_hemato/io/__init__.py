"""Core objects <-> napari layer data: npe2 readers, writers and samples."""
