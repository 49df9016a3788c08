"""napari-hemato: whole-slide deep learning for blood smears and H&E in napari.

Importing this package is cheap: it pulls in neither Qt, torch nor onnxruntime.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
