"""Qt-free core: slides, tiling, inference engine, stitching, tables.

Nothing here imports napari, Qt, torch or onnxruntime at import time.
"""
