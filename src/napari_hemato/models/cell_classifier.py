"""White-blood-cell classifier (11 PBC classes) with class activation maps.

Runtime code: numpy, scipy, Pillow and onnxruntime only (no torch). Every
cell is normalised by its own size before the network sees it, so the model
works whatever the magnification: a square window of side
``diameter * context`` centred on the cell is cut out (mirrored at the image
border), resized to the model's ``input_size`` and classified. Training uses
exactly the same functions (:mod:`napari_hemato.models.cell_windows`), and the colour standardisation the spec's
``preprocess["colour"]`` names (:mod:`napari_hemato.models.colour_standardize`).

Examples
--------
>>> clf = CellClassifier()  # doctest: +SKIP
>>> probs, cams = clf.classify_crops([crop])  # doctest: +SKIP
>>> clf.spec.class_names[int(probs[0].argmax())]  # doctest: +SKIP
'SNE'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import ModelError
from napari_hemato.models.cell_windows import (  # noqa: F401 - the classifier's geometry
    DEFAULT_CONTEXT,
    FALLBACK_FRACTION,
    as_rgb8,
    cam_to_crop,
    cell_window,
    estimate_cell_diameter,
    extract_window,
    normalize_cell,
    segment_center_cell,
)
from napari_hemato.models.colour_standardize import COLOUR_MODES, apply_colour_mode
from napari_hemato.models.window_scale import (
    NEIGHBOURHOOD,
    WHOLE_FIELD_PX,
    PooledReading,
    WindowScale,
    field_mpp_for_cells,
    known_mpp,
)

log = logging.getLogger(__name__)

#: the 11 PBC classes, in the bundled classifier's output order (the smear task's subtypes)
CLASS_NAMES = ("SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT")


class CellClassifier:
    """Classify white cells into the 11 PBC classes with an ONNX model.

    Parameters
    ----------
    model_dir : path, optional
        Model folder (``model.onnx`` + ``model.json``, kind ``classifier``);
        None uses the bundled ``wbc`` model.
    providers : str or list of str, optional
        onnxruntime providers (``"cpu"`` default, ``"cuda"``, ``"auto"``).
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice or ``NAPARI_HEMATO_THREADS``).

    Attributes
    ----------
    spec : ModelSpec
        The model's spec (class names, input size, ``preprocess["context"]``).

    Examples
    --------
    >>> clf = CellClassifier()  # doctest: +SKIP
    >>> probs, cams = clf.classify_crops([crop])  # doctest: +SKIP
    >>> probs.shape, cams[0].shape == crop.shape[:2]  # doctest: +SKIP
    ((1, 11), True)
    """

    def __init__(self, model_dir: str | Path | None = None, *, providers=None, threads: int | None = None):
        from napari_hemato.models.onnx_backend import OnnxPredictor
        from napari_hemato.models.registry import resolve_model

        folder = resolve_model("wbc", model_dir)
        self._predictor = OnnxPredictor(folder, providers=providers, threads=threads)
        self.spec = self._predictor.spec
        if self.spec.kind != "classifier":
            raise ModelError(f"{folder}: model {self.spec.name!r} is a {self.spec.kind!r} model, not a classifier")
        if not self.spec.input_size:
            raise ModelError(f"{folder}: classifier spec needs 'input_size'")
        self.size = int(self.spec.input_size)
        self.context = float(self.spec.preprocess.get("context", DEFAULT_CONTEXT))
        try:
            #: window-size policy (``preprocess["scale"]``); ``.sources`` counts where sides came from
            self.scale = WindowScale.from_preprocess(self.spec.preprocess, default_context=DEFAULT_CONTEXT)
        except ValueError as exc:
            raise ModelError(f"{folder}: {exc}") from exc
        self.colour = self.spec.preprocess.get("colour", "none")
        if self.colour not in COLOUR_MODES:
            raise ModelError(f"{folder}: unknown preprocess colour mode {self.colour!r} "
                             f"(known: {', '.join(COLOUR_MODES)})")

    def __repr__(self) -> str:
        return (f"CellClassifier({self.spec.name!r} {self.spec.version}, {self.size}px, "
                f"scale {self.scale.mode}, context {self.context})")

    @property
    def has_embedding(self) -> bool:
        """Whether the model outputs its pooled features (``embedding``): needed to fine-tune."""
        return "embedding" in self.spec.outputs

    def _classify(self, items, batch_size: int, *, embeddings: bool = False, cams: bool = True):
        """``items``: iterable of (image, centre, side, out_shape, offset) -> probs, cams
        (and, with ``embeddings``, the (n, D) pooled features instead of the CAMs; without
        ``cams``, an empty list: the CAM output is neither computed nor resized)."""
        items = list(items)
        n_cls = len(self.spec.class_names)
        if embeddings and not self.has_embedding:
            raise ModelError(f"{self.spec.folder}: model {self.spec.name!r} has no 'embedding' output")
        if not items:
            return np.zeros((0, n_cls), np.float32), (np.zeros((0, 0), np.float32) if embeddings else [])
        probs_all, cams_all, emb_all = [], [], []
        for start in range(0, len(items), max(1, int(batch_size))):
            chunk = items[start : start + batch_size]
            xs, wins = [], []
            for image, center, side, _shape, _offset in chunk:
                x, win = normalize_cell(image, center, side, context=1.0, size=self.size)
                xs.append(x)
                wins.append(win)
            roles = ["probs", "embedding"] if embeddings else (None if cams else ["probs"])
            out = self._predictor.predict(apply_colour_mode(np.stack(xs), self.colour), roles=roles)
            probs, cam = out["probs"].astype(np.float32), out.get("cam")
            probs_all.append(probs)
            if embeddings:
                emb_all.append(out["embedding"].reshape(len(chunk), -1))
                continue
            if not cams:
                continue
            for i, (_, _, _, shape, offset) in enumerate(chunk):
                if cam is None:
                    cams_all.append(np.zeros(shape, np.float32))
                    continue
                y0, x0, side = wins[i]
                win = (y0 - offset[0], x0 - offset[1], side)
                cams_all.append(cam_to_crop(cam[i, int(probs[i].argmax())], win, shape))
        return np.concatenate(probs_all), (np.concatenate(emb_all) if embeddings else cams_all)

    def _crop_items(self, crops, diameters_px, mpp=None) -> list:
        crops = [as_rgb8(c) for c in crops]
        if diameters_px is None:
            diameters_px = [None] * len(crops)
        if len(diameters_px) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(diameters_px)} diameters")
        todo = [i for i, d in enumerate(diameters_px) if d is None or not np.isfinite(d) or d <= 0]
        if self.scale.mode == "red-cell" and mpp is not None:  # a known pixel size needs no diameter
            known = known_mpp(mpp, len(crops))
            todo = [i for i in todo if not (np.isfinite(known[i]) and known[i] > 0)]
        diameters = [d if d is None else float(d) for d in diameters_px]
        for i, d in zip(todo, _estimate_diameters([crops[i] for i in todo]), strict=True):
            diameters[i] = d
        sides = self.scale.sides(list(zip(crops, diameters, strict=True)), mpp=mpp)
        return [(crop, ((crop.shape[0] - 1) / 2, (crop.shape[1] - 1) / 2), s, crop.shape[:2], (0, 0))
                for crop, s in zip(crops, sides, strict=True)]

    def pooled_mpp(self, crops: Sequence[np.ndarray]):
        """One pixel size for single-cell crops from one source (a sample of a folder), read by
        the red-cell ruler and pooled (:meth:`WindowScale.pooled_reading`); a
        :class:`~napari_hemato.models.window_scale.PooledReading` (``mpp`` None when the
        readings are too few or disagree, and always for self-scale models)."""
        if self.scale.mode != "red-cell":
            return PooledReading(None, 0, 0, float("nan"))
        crops = [as_rgb8(c) for c in crops]
        return self.scale.pooled_reading(list(zip(crops, _estimate_diameters(crops), strict=True)))

    def embed_crops(self, crops: Sequence[np.ndarray], diameters_px: Sequence[float] | None = None, *,
                    mpp=None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, embeddings)`` of single-cell crops, preprocessed as :meth:`classify_crops`."""
        return self._classify(self._crop_items(crops, diameters_px, mpp), batch_size, embeddings=True)

    def classify_crops(
        self, crops: Sequence[np.ndarray], diameters_px: Sequence[float] | None = None, *, mpp=None,
        batch_size: int = 64, cams: bool = True,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Classify single-cell crops (one cell at the centre of each).

        Parameters
        ----------
        crops : list of (h, w, 3) uint8 arrays
            Any size and magnification; the cell is assumed at the crop centre.
        diameters_px : list of float, optional
            The cell's diameter in each crop; None (or a None entry) estimates
            it with :func:`estimate_cell_diameter`.
        mpp : float or list of float, optional
            µm/px of the crops (one for all or one each), used by red-cell-scale
            models (``spec.preprocess["scale"] == "red-cell"``); unknown: the
            red-cell ruler measures each crop. Ignored by self-scale models.
        batch_size : int
            Cells per onnxruntime call.
        cams : bool
            Compute the CAMs (False: probabilities only, faster; ``cams`` is empty).

        Returns
        -------
        probs : (n, 11) float32
            Softmax probabilities in ``spec.class_names`` order.
        cams : list of (h, w) float32
            CAM of the predicted class in [0, 1], same size as each crop.

        Examples
        --------
        >>> probs, cams = CellClassifier().classify_crops([crop], [80.0])  # doctest: +SKIP
        """
        return self._classify(self._crop_items(crops, diameters_px, mpp), batch_size, cams=cams)

    def classify_in_image(
        self, image: np.ndarray, centers_yx: np.ndarray, diameters_px: np.ndarray, *, mpp: float | None = None,
        batch_size: int = 64,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Classify cells lying inside a larger image (smear field, slide region).

        Each cell's window (side ``diameter * context``, or ``window_um / mpp``
        for red-cell-scale models; mirrored where it leaves the image) is cut
        around its centre, resized and classified.

        Parameters
        ----------
        image : (H, W, 3) uint8
        centers_yx : (n, 2) array
            Cell centres (row, column) in pixels of ``image``.
        diameters_px : (n,) array
            Cell diameters in pixels of ``image``.
        mpp : float, optional
            µm/px of ``image`` (red-cell-scale models; the smear pipeline passes
            the field's). Unknown: the red-cell ruler measures the field once
            (up to ~1.3 MP) or each cell's neighbourhood (larger images).
        batch_size : int
            Cells per onnxruntime call.

        Returns
        -------
        probs : (n, 11) float32
        cams : list of (side, side) float32
            CAM of the predicted class over each cell's window.

        Examples
        --------
        >>> probs, cams = clf.classify_in_image(field, [[240, 320]], [180.0])  # doctest: +SKIP
        """
        return self._classify(self._image_items(image, centers_yx, diameters_px, mpp), batch_size)

    def embed_in_image(self, image: np.ndarray, centers_yx, diameters_px, *, mpp: float | None = None,
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, embeddings)`` of cells in a larger image, as :meth:`classify_in_image`."""
        return self._classify(self._image_items(image, centers_yx, diameters_px, mpp), batch_size,
                              embeddings=True)

    def _image_items(self, image, centers_yx, diameters_px, mpp=None) -> list:
        image = as_rgb8(image)
        centers = np.asarray(centers_yx, float).reshape(-1, 2)
        diameters = np.asarray(diameters_px, float).reshape(-1)
        if len(centers) != len(diameters):
            raise ValueError(f"{len(centers)} centres but {len(diameters)} diameters")
        if (~np.isfinite(diameters) | (diameters <= 0)).any():
            raise ValueError("diameters_px must be positive and finite")
        sides = image_sides(self.scale, image, centers, diameters, mpp)
        items = []
        for c, side in zip(centers, sides, strict=True):
            y0, x0, side_i = cell_window(c, side, 1.0)
            items.append((image, c, side, (side_i, side_i), (y0, x0)))
        return items


def _estimate_diameters(crops: list[np.ndarray]) -> list[float]:
    """:func:`estimate_cell_diameter` of each crop, on two threads (numpy/scipy work that
    releases the GIL; the same results as one thread)."""
    if not crops:
        return []
    with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1, len(crops)))) as pool:
        return list(pool.map(estimate_cell_diameter, crops))


def image_sides(scale: WindowScale, image: np.ndarray, centers, diameters, mpp=None) -> np.ndarray:
    """Window sides (px) of cells inside a field, by ``scale``'s policy.

    Red-cell scale without ``mpp``: one ruler reading of the whole field (its
    white cells left out) when it is at most ``WHOLE_FIELD_PX``, else of each
    cell's neighbourhood (``NEIGHBOURHOOD`` x its diameter).
    """
    if scale.mode == "self" or (mpp is not None and np.isfinite(mpp) and mpp > 0) or not len(centers):
        return scale.sides([(None, d) for d in diameters], mpp=mpp)
    if image.shape[0] * image.shape[1] <= WHOLE_FIELD_PX:
        m = field_mpp_for_cells(scale, image, centers, diameters)
        if m is not None:
            return scale.sides([(None, d) for d in diameters], mpp=m, source="red-cell")
    cells = []
    for c, d in zip(centers, diameters, strict=True):
        y0, x0, side = cell_window(c, d, NEIGHBOURHOOD)
        cells.append((extract_window(image, y0, x0, side), d))
    return scale.sides(cells)
