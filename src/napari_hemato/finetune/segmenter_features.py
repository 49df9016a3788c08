"""A segmenter's per-pixel features: the input of the 1×1 convolution its maps come from.

The nucleus segmenter's ``foreground`` and ``distance`` maps are ``sigmoid(w_c · f + b_c)``
of one 1×1 convolution over full-resolution features ``f`` (channels 0 and 1): two
per-pixel logistic outputs over the same features, refit by
:mod:`napari_hemato.finetune.nuclei`. The smear detector adds ``class_probs``, a softmax over
three more channels of the same convolution (:attr:`SegmenterFeatures.class_head`), refit by
:mod:`napari_hemato.finetune.smear`. :meth:`SegmenterFeatures.run` computes ``f`` for a
whole region in tiles (each with the receptive field as halo), so any export fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError
from napari_hemato.finetune import onnx_edit
from napari_hemato.finetune.head import BinaryHead, Head, sigmoid

#: the model-grid side of a tile the features are computed on (plus the halo)
TILE = 1024
ROLES = ("foreground", "distance")


@dataclass
class SegmenterFeatures:
    """A segmenter run for its features: the predictor and its two heads (foreground, distance)."""

    predictor: object  # OnnxPredictor, float network
    heads: dict[str, onnx_edit.HeatmapHead]
    init: dict[str, BinaryHead]  # the shipped weights of each channel
    #: a model with ``class_probs``: where they come from (channels of the same convolution)
    #: and their shipped weights
    class_head: onnx_edit.ClassMapsHead | None = None
    init_classes: Head | None = None

    @classmethod
    def load(cls, folder: str | Path, *, threads: int | None = None) -> SegmenterFeatures:
        from napari_hemato.models.onnx_backend import OnnxPredictor

        predictor = OnnxPredictor(folder, threads=threads, precision="float")  # the refit edits it
        spec = predictor.spec
        if "features" not in spec.outputs:
            raise HematoError(f"{spec.folder}: model {spec.name!r} has no 'features' output "
                              "(napari_hemato.finetune.features.add_features_output(folder, "
                              "'foreground') adds it)")
        missing = [r for r in ROLES if r not in spec.outputs]
        if missing:
            raise HematoError(f"{spec.folder}: model {spec.name!r} has no {missing} output: "
                              "not a foreground + distance segmenter")
        model = onnx_edit.load(spec.onnx_path)
        heads = {r: onnx_edit.find_heatmap_head(model, spec.outputs[r]) for r in ROLES}
        fg, dist = heads["foreground"], heads["distance"]
        if (fg.weight, fg.features) != (dist.weight, dist.features) or fg.upsample != 1 or dist.upsample != 1:
            raise HematoError(f"{spec.folder}: the foreground and distance maps do not come from one "
                              "full-resolution 1×1 convolution: no head refit for this model")
        w = onnx_edit.initializer(model, fg.weight)[:, :, 0, 0].astype(np.float64)
        b = onnx_edit.initializer(model, fg.bias).astype(np.float64)
        init = {r: BinaryHead(w[h.channel].copy(), float(b[h.channel])) for r, h in heads.items()}
        class_head = init_classes = None
        if "class_probs" in spec.outputs:
            class_head = onnx_edit.find_class_maps_head(model, spec.outputs["class_probs"])
            if (class_head.weight, class_head.features) != (fg.weight, fg.features):
                raise HematoError(f"{spec.folder}: the class maps do not come from the foreground's "
                                  "1×1 convolution: no head refit for this model")
            sl = slice(class_head.start, class_head.end)
            init_classes = Head(w[sl].copy(), b[sl].copy())
        return cls(predictor, heads, init, class_head, init_classes)

    def refit_layer(self, maps: dict[str, BinaryHead], classes: Head | None = None):
        """``(model, weight, bias)``: a copy of the ONNX graph with ``maps`` (and ``classes``)
        written into the last 1×1 convolution, and that layer's new initializers."""
        model = onnx_edit.load(self.spec.onnx_path)
        head = self.heads["foreground"]
        w = onnx_edit.initializer(model, head.weight).copy()
        b = onnx_edit.initializer(model, head.bias).copy()
        for role in ROLES:
            c = self.heads[role].channel
            w[c, :, 0, 0] = maps[role].weight
            b[c] = maps[role].bias
        if classes is not None:
            sl = slice(self.class_head.start, self.class_head.end)
            w[sl, :, 0, 0] = classes.weight
            b[sl] = classes.bias
        onnx_edit.set_initializer(model, head.weight, w)
        onnx_edit.set_initializer(model, head.bias, b)
        return model, w, b

    @property
    def spec(self):
        return self.predictor.spec

    @property
    def dim(self) -> int:
        return len(self.init["foreground"].weight)

    def _margin(self) -> int:
        """The halo: the receptive field's one-sided reach (as the engine reads it), to the
        size divisor (tiles then start on the network's pooling grid)."""
        div = max(int(self.spec.size_divisor), 1)
        return -(-int(self.spec.receptive_field_px) // div) * div

    def _run_padded(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        div = max(int(self.spec.size_divisor), 1)
        padded = np.pad(image, ((0, (-h) % div), (0, (-w) % div), (0, 0)),
                        constant_values=self.spec.pad_value)
        out = self.predictor.predict(padded[None], roles=["features"])["features"]
        return out[0, :, :h, :w]

    def run(self, image: np.ndarray, cancel=None, *, pad_edges: bool = False) -> np.ndarray:
        """Features ``(D, H, W)`` float32 of an RGB uint8 image on the model grid, in tiles of
        :data:`TILE` px with the receptive field as halo (the same values as one run).

        ``pad_edges``: the image is a whole field; every side is padded with the model's
        ``pad_value`` by the halo first, as the engine reads an image's edges (without it, only
        the bottom and right are padded, to the size divisor). ``cancel()`` is called between
        tiles (it may raise to stop)."""
        image = np.asarray(image, np.uint8)
        if pad_edges:
            m = self._margin()
            padded = np.pad(image, ((m, m), (m, m), (0, 0)), constant_values=self.spec.pad_value)
            return self.run(padded, cancel)[:, m : m + image.shape[0], m : m + image.shape[1]]
        h, w = image.shape[:2]
        if h <= TILE and w <= TILE:
            return self._run_padded(image)
        m = self._margin()
        out = np.empty((self.dim, h, w), np.float32)
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                if cancel is not None:
                    cancel()
                y0, x0 = max(y - m, 0), max(x - m, 0)
                y1, x1 = min(y + TILE + m, h), min(x + TILE + m, w)
                f = self._run_padded(image[y0:y1, x0:x1])
                ys, xs = min(y + TILE, h), min(x + TILE, w)
                out[:, y:ys, x:xs] = f[:, y - y0 : ys - y0, x - x0 : xs - x0]
        return out

    @staticmethod
    def maps(features: np.ndarray, heads: dict[str, BinaryHead]) -> tuple[np.ndarray, np.ndarray]:
        """``(foreground, distance)`` maps (H, W) of ``features`` (D, H, W) with ``heads``."""
        d = features.shape[0]
        flat = features.reshape(d, -1).T
        out = [sigmoid(heads[r].logits(flat)).reshape(features.shape[1:]).astype(np.float32) for r in ROLES]
        return out[0], out[1]

    @staticmethod
    def class_maps(features: np.ndarray, head: Head) -> np.ndarray:
        """Class probabilities ``(C, H, W)`` of ``features`` (D, H, W) with ``head``."""
        d = features.shape[0]
        probs = head.probs(features.reshape(d, -1).T)
        return probs.T.reshape(-1, *features.shape[1:]).astype(np.float32)
