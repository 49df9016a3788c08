"""Thin magicgui/Qt widgets; logic lives in :mod:`napari_hemato.core`."""
