"""The predictor protocol the engine calls."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.spec import ModelSpec


@runtime_checkable
class Predictor(Protocol):
    """Runs a model on a batch of RGB uint8 tiles.

    ``predict`` takes ``(N, H, W, 3)`` uint8 and returns a dict mapping each
    output *role* of ``spec.outputs`` to a float32 array (``(N, C, H, W)`` for
    dense outputs, ``(N, C)`` for classifier probabilities).
    """

    spec: ModelSpec

    def predict(
        self, batch: np.ndarray, *, cancel: CancelToken | None = None
    ) -> dict[str, np.ndarray]: ...
