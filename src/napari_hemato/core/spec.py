"""Model specs: what a model needs (µm/px, tile, halo, normalisation) and returns.

A model is a folder holding ``model.onnx`` and ``model.json``. The spec is the
single source of truth the engine reads: it derives the halo from the largest
object the model is meant to find plus the network's receptive field, resamples
the slide to the model's µm/px, and maps output names to roles.

Example ``model.json``::

    {
      "name": "hemato-nuclei-he", "version": "0.1.0",
      "task": "nuclei", "kind": "instances",
      "mpp": 0.5, "tile": 512, "max_object_um": 24, "receptive_field_px": 32,
      "size_divisor": 16, "channels": "RGB", "pad_value": 255,
      "input_name": "image",
      "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "class_names": ["nucleus"],
      "outputs": {"foreground": "fg", "distance": "dist"},
      "postprocess": {"threshold": 0.5, "min_distance_um": 2.0, "min_area_um2": 8.0},
      "sha256": "<hex digest of model.onnx>"
    }

An optional ``"int8": {"onnx": "model_int8.onnx", "sha256": ..., "postprocess": {...}}``
names an int8 version of the same network (:mod:`napari_hemato.train.quantize`), which the
CPU runs by default (:func:`napari_hemato.models.onnx_backend.resolve_precision`), with
its own post-processing values where they differ (a detection threshold calibrated on its
scores; :meth:`ModelSpec.for_precision`); ``model.onnx`` stays the float reference (GPU,
export, fine-tuning).

``sha256`` ties the spec to its weights: loading a model refuses an ONNX file
that does not match it (replaced, truncated or damaged), and :func:`write_spec`
(which trainers and :meth:`ModelSpec.save` use) fills it in. A spec without it
(an older user model) still loads, with a logged warning.

Kinds and output roles (all outputs are NCHW float32, same H, W as the input):

- ``instances``: ``foreground`` (N,1,H,W) probability; optional ``distance``
  (N,1,H,W) distance-to-boundary map used for watershed seeds; optional
  ``class_probs`` (N,C,H,W) per-pixel class probabilities averaged per object;
  optional ``features`` (N,D,H,W), the tensor the last 1×1 convolution of
  ``foreground`` and ``distance`` reads (only fine-tuning asks for it).
- ``points``: ``heatmap`` (N,1,H,W) probability of an object centre; optional
  ``class_probs`` (N,C,H,W) read at each peak; optional ``features`` (N,D,h,w), the
  tensor the heatmap's last 1×1 convolution reads (coarser than the input; only
  fine-tuning asks for it, see :data:`ON_REQUEST`).
- ``classifier``: fixed-size cell crops in, ``probs`` (N,C) out; optional ``cam``
  (N,C,h,w) class activation maps. Cropping rules live in ``preprocess``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_hemato.core.errors import ModelError

log = logging.getLogger(__name__)

KINDS = ("instances", "points", "classifier")
_ROLES = {
    "instances": ({"foreground"}, {"distance", "class_probs", "features"}),  # features: for fine-tuning
    "points": ({"heatmap"}, {"class_probs", "features"}),  # features: for fine-tuning
    "classifier": ({"probs"}, {"cam", "logits", "embedding"}),  # embedding: for fine-tuning
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model.

    Parameters
    ----------
    name, version : str
        Identify the model; both are written into every result table row.
    task : str
        The task its outputs serve: ``nuclei``, ``smear``, ``mitosis``, ``wbc`` (the smear
        task's classifier) or a registered task's name (:mod:`napari_hemato.tasks`).
    kind : str
        ``instances``, ``points`` or ``classifier`` (see module docstring).
    mpp : float or None
        Input pixel size in µm/px (None for crop classifiers).
    tile : int
        Default tile core size in model pixels.
    max_object_um : float
        Largest object diameter the model is meant to find, in µm.
    receptive_field_px : int
        Half-width of the network's receptive field in model pixels.
    assumed_input_mpp : float, optional
        Pixel size assumed for an image that states none: that of the images
        the model was trained on (smear: BCCD's 0.08 µm/px camera fields, which
        the model sees downsampled to ``mpp`` 0.16). Default: ``mpp``.
    sha256 : str, optional
        Hex SHA-256 of the ONNX file; loading checks it (see :func:`check_weights`).
    int8 : dict, optional
        ``{"onnx": file, "sha256": hex, "postprocess": {...}}``: an int8 version of the
        network for CPUs, and the post-processing values it needs instead of the float's.
    """

    name: str
    version: str
    task: str
    kind: str
    class_names: tuple[str, ...]
    outputs: dict[str, str]
    mpp: float | None = None
    assumed_input_mpp: float | None = None
    tile: int = 512
    max_object_um: float = 20.0
    receptive_field_px: int = 16
    size_divisor: int = 1
    input_size: int | None = None
    channels: str = "RGB"
    pad_value: int = 255
    input_name: str = "image"
    normalization: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    onnx: str = "model.onnx"
    sha256: str | None = None
    int8: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if self.kind not in KINDS:
            raise ModelError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.task, str) or not self.task.isidentifier():
            raise ModelError(f"{where}: task {self.task!r} is not a task name")
        if self.channels not in ("RGB",):
            raise ModelError(f"{where}: channels {self.channels!r} unsupported (only 'RGB')")
        required, optional = _ROLES[self.kind]
        missing = required - set(self.outputs)
        unknown = set(self.outputs) - required - optional
        if missing:
            raise ModelError(f"{where}: outputs lack role(s) {sorted(missing)}")
        if unknown:
            raise ModelError(f"{where}: unknown output role(s) {sorted(unknown)}")
        if self.kind != "classifier" and (self.mpp is None or self.mpp <= 0):
            raise ModelError(f"{where}: a {self.kind} model needs a positive 'mpp'")
        if self.assumed_input_mpp is not None and not self.assumed_input_mpp > 0:
            raise ModelError(f"{where}: 'assumed_input_mpp' must be positive")
        if self.tile <= 0 or self.size_divisor <= 0:
            raise ModelError(f"{where}: 'tile' and 'size_divisor' must be positive")
        if not self.class_names:
            raise ModelError(f"{where}: 'class_names' is empty")
        if self.sha256 is not None and not _is_hex64(self.sha256):
            raise ModelError(f"{where}: 'sha256' must be 64 hex digits (of {self.onnx})")
        if self.int8 is not None:
            if not isinstance(self.int8, dict) or not isinstance(self.int8.get("onnx"), str):
                raise ModelError(f"{where}: 'int8' must be {{\"onnx\": file, \"sha256\": hex}}")
            if set(self.int8) - {"onnx", "sha256", "postprocess"}:
                raise ModelError(f"{where}: 'int8' has unknown key(s) "
                                 f"{sorted(set(self.int8) - {'onnx', 'sha256', 'postprocess'})}")
            if not isinstance(self.int8.get("postprocess", {}), dict):
                raise ModelError(f"{where}: 'int8.postprocess' must be an object")
            if not _is_hex64(self.int8.get("sha256", "0" * 64)):
                raise ModelError(f"{where}: 'int8.sha256' must be 64 hex digits")
        norm = self.normalization
        for key in ("mean", "std"):
            if key in norm and len(norm[key]) != 3:
                raise ModelError(f"{where}: normalization.{key} needs 3 values (RGB)")

    # -- derived quantities -------------------------------------------------
    @property
    def halo(self) -> int:
        """Halo in model pixels: largest object plus receptive field.

        An object owned by a tile has its centroid in the tile's core, so all
        its pixels lie within one object diameter of the core; their
        predictions are exact when the receptive field fits in the tile too.
        """
        if self.mpp is None:
            return 0
        return int(math.ceil(self.max_object_um / self.mpp)) + int(self.receptive_field_px)

    @property
    def onnx_path(self) -> Path:
        if self.folder is None:
            raise ModelError(f"model {self.name!r}: spec was not loaded from a folder")
        return self.folder / self.onnx

    @property
    def int8_path(self) -> Path | None:
        """The int8 network's file (None: the spec names none)."""
        if self.int8 is None:
            return None
        return self.onnx_path.parent / self.int8["onnx"]

    def for_precision(self, precision: str) -> ModelSpec:
        """The spec as the ``precision`` (``"float"`` or ``"int8"``) network runs: the int8
        network's ``postprocess`` values replace the float's.

        Examples
        --------
        >>> spec = ModelSpec(name="m", version="1", task="mitosis", kind="points", mpp=0.25,
        ...                  class_names=("mitosis",), outputs={"heatmap": "h"},
        ...                  postprocess={"threshold": 0.7, "radius_um": 5.0},
        ...                  int8={"onnx": "q.onnx", "postprocess": {"threshold": 0.65}})
        >>> spec.for_precision("int8").postprocess
        {'threshold': 0.65, 'radius_um': 5.0}
        >>> spec.for_precision("float").postprocess["threshold"]
        0.7
        """
        own = (self.int8 or {}).get("postprocess") if precision == "int8" else None
        if not own:
            return self
        return replace(self, postprocess={**self.postprocess, **own})

    @property
    def fingerprint(self) -> str:
        """Short hash of the spec (and weights file size) identifying a run's model."""
        payload = {k: v for k, v in self.to_dict().items()}
        if self.folder is not None and self.onnx_path.exists():
            payload["_onnx_bytes"] = self.onnx_path.stat().st_size
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC RGB -> float32 NCHW as the network expects (each image colour-matched
        first when ``preprocess["colour_match"]`` says so: :mod:`napari_hemato.core.colour_match`)."""
        match = self.preprocess.get("colour_match")
        if match:
            from napari_hemato.core.colour_match import match_colour

            batch = np.stack([match_colour(image, match) for image in np.asarray(batch)])
        x = batch.astype(np.float32) * np.float32(self.normalization.get("scale", 1 / 255))
        if "mean" in self.normalization:
            x -= np.asarray(self.normalization["mean"], np.float32)
        if "std" in self.normalization:
            x /= np.asarray(self.normalization["std"], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("folder")
        if d["sha256"] is None:  # a spec without one reads (and fingerprints) as before
            d.pop("sha256")
        if d["int8"] is None:
            d.pop("int8")
        d["class_names"] = list(self.class_names)
        return d

    def save(self, folder: str | Path) -> Path:
        """Write ``model.json`` into ``folder`` (created if needed), with the
        ``sha256`` of the ONNX file there (see :func:`write_spec`)."""
        return write_spec(folder, self.to_dict())


@functools.lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: output roles a predictor computes only when asked (large, and only fine-tuning needs them)
ON_REQUEST = frozenset({"features"})


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, cached by (path, mtime, size) like the session cache."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_mtime_ns, st.st_size)


def write_spec(folder: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``spec`` as ``folder/model.json`` with the ``sha256`` of its ONNX file.

    What trainers and :meth:`ModelSpec.save` write specs with: write ``model.onnx``
    first, then the spec, so the hash is that of the final weights.
    Without an ONNX file in ``folder`` the spec is written without ``sha256``.

    Examples
    --------
    >>> write_spec("my_model", {"name": "m", "version": "1", ...})  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(spec)
    onnx = folder / spec.get("onnx", "model.onnx")
    if onnx.is_file():
        spec["sha256"] = file_sha256(onnx)
    else:
        spec.pop("sha256", None)
    if spec.get("int8"):
        int8 = {k: v for k, v in spec["int8"].items() if k != "sha256"}
        if (folder / int8["onnx"]).is_file():
            int8["sha256"] = file_sha256(folder / int8["onnx"])
        spec["int8"] = int8
    path = folder / "model.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def _is_hex64(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdefABCDEF" for c in value))


def check_weights(spec: ModelSpec, precision: str = "float") -> Path:
    """The spec's ONNX file (``precision="int8"``: its int8 file), checked: raise
    ModelError unless it has the ``sha256`` the spec records.

    A spec without ``sha256`` passes with a logged warning (once per file).
    """
    if precision == "int8":
        if spec.int8 is None:
            raise ModelError(f"model {spec.name!r}: model.json names no int8 network")
        path, name, expected = spec.int8_path, spec.int8["onnx"], spec.int8.get("sha256")
    else:
        path, name, expected = spec.onnx_path, spec.onnx, spec.sha256
    if not path.is_file():
        raise ModelError(f"{path}: ONNX model file not found")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: ONNX model file is empty")
    if expected is None:
        _warn_unchecked(str(path.resolve()))
        return path
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ModelError(
            f"{spec.folder}: {name} does not match model.json: sha256 {actual} expected "
            f"{expected} (the weights were replaced or damaged: restore the {name} this "
            "spec was written for, or re-export the model)"
        )
    return path


@functools.lru_cache(maxsize=256)
def _warn_unchecked(path: str) -> None:
    log.warning("%s: model.json records no sha256, so these weights cannot be checked "
                "(write the spec again with napari_hemato.core.spec.write_spec to add it)", path)


def load_spec(folder: str | Path) -> ModelSpec:
    """Read ``model.json`` from a model folder (or the path of the JSON itself).

    Raises
    ------
    ModelError
        If the folder or spec is missing, is not valid JSON, or is incomplete.

    Examples
    --------
    >>> from napari_hemato.models.registry import bundled_models
    >>> load_spec(bundled_models()["nuclei"]).task
    'nuclei'
    """
    path = Path(folder)
    if path.is_dir():
        path = path / "model.json"
    if not path.exists():
        raise ModelError(f"{path}: model spec not found (expected a folder with model.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: model spec is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: model spec must be a JSON object")
    known = set(ModelSpec.__dataclass_fields__) - {"folder"}
    unknown = set(raw) - known
    if unknown:
        raise ModelError(f"{path}: unknown spec field(s) {sorted(unknown)}")
    for key in ("name", "version", "task", "kind", "class_names", "outputs"):
        if key not in raw:
            raise ModelError(f"{path}: model spec lacks required field {key!r}")
    raw["class_names"] = tuple(raw["class_names"])
    try:
        return ModelSpec(**raw, folder=path.parent)
    except TypeError as err:
        raise ModelError(f"{path}: bad model spec ({err})") from None
