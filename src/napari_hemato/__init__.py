"""napari-hemato: whole-slide deep learning for blood smears and H&E in napari.

Importing this package is cheap: it pulls in neither Qt, torch nor onnxruntime.
:func:`analyze` and :mod:`api` load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "api", "iter_analyze"]


def __getattr__(name: str):
    if name == "api":
        return importlib.import_module("napari_hemato.api")
    if name in ("analyze", "iter_analyze"):
        return getattr(importlib.import_module("napari_hemato.api"), name)
    raise AttributeError(f"module 'napari_hemato' has no attribute {name!r}")
