"""onnxruntime backend: a cached session loader and an ONNX predictor.

onnxruntime is imported inside functions so that importing napari-hemato stays
cheap. Sessions are cached by (model path, file mtime, providers, threads): a
widget calling the model on every click never reloads it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import Cancelled, ModelError
from napari_hemato.core.spec import ON_REQUEST, ModelSpec, check_weights, load_spec


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (CUDA when onnxruntime-gpu is installed)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(providers: str | list[str] | None) -> tuple[str, ...]:
    """Normalise a provider request: None/"cpu" -> CPU, "cuda" -> CUDA then CPU, "auto" -> best."""
    available = available_providers()
    if providers is None or providers == "cpu":
        return ("CPUExecutionProvider",)
    if providers == "auto":
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return tuple(p for p in wanted if p in available) or ("CPUExecutionProvider",)
    if providers == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ModelError(
            f"execution provider(s) {missing} not available (this onnxruntime offers {available}; "
            "for CUDA install napari-hemato[gpu])"
        )
    return tuple(providers)


@functools.lru_cache(maxsize=8)
def _cached_session(path: str, mtime: float, providers: tuple[str, ...], threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle intra-op threads sleep instead of spinning: the engine's reader and finisher
    # threads (and napari's) share the cores; 36 MP of nuclei end to end, 2 cores: 5 % faster
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises several unrelated types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path}: cannot load ONNX model ({first})") from None


def load_session(path: str | Path, *, providers=None, threads: int | None = None):
    """A cached ``onnxruntime.InferenceSession`` for ``path``."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: ONNX model file not found")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: ONNX model file is empty")
    if threads is None:
        threads = int(os.environ.get("NAPARI_HEMATO_THREADS", "0"))
    return _cached_session(str(path.resolve()), path.stat().st_mtime, resolve_providers(providers), threads)


PRECISIONS = ("auto", "float", "int8")


def resolve_precision(spec: ModelSpec, precision: str | None, providers) -> str:
    """Which network of ``spec`` to run: ``"float"`` or ``"int8"``.

    ``auto`` (the default, or ``NAPARI_HEMATO_PRECISION``) runs the spec's int8 network
    when there is one and only the CPU runs it (int8 convolutions are faster there;
    GPUs get the float one); ``int8`` without an int8 network is an error.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> spec = SimpleNamespace(int8={"onnx": "model_int8.onnx"}, name="m")
    >>> resolve_precision(spec, "auto", None), resolve_precision(spec, "float", None)
    ('int8', 'float')
    >>> resolve_precision(SimpleNamespace(int8=None, name="m"), "auto", None)
    'float'
    """
    precision = precision or os.environ.get("NAPARI_HEMATO_PRECISION") or "auto"
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8" and spec.int8 is None:
        raise ModelError(f"model {spec.name!r} has no int8 network (model.json 'int8'); "
                         "use precision 'float' or 'auto'")
    if precision == "auto":
        cpu_only = resolve_providers(providers) == ("CPUExecutionProvider",)
        return "int8" if spec.int8 is not None and cpu_only else "float"
    return precision


class OnnxPredictor:
    """Run a model folder (``model.onnx`` + ``model.json``) with onnxruntime.

    Parameters
    ----------
    model : path or ModelSpec
        Model folder, or an already loaded spec.
    providers : str or list of str, optional
        ``"cpu"`` (default), ``"cuda"``, ``"auto"`` or explicit provider names.
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice, or ``NAPARI_HEMATO_THREADS``).
    precision : str, optional
        ``auto`` (default), ``float`` or ``int8``: see :func:`resolve_precision`. The
        network run is ``self.precision``; ``self.spec`` is the model's spec as that
        network runs (:meth:`~napari_hemato.core.spec.ModelSpec.for_precision`).

    Examples
    --------
    >>> predictor = OnnxPredictor("path/to/model_dir")  # doctest: +SKIP
    >>> out = predictor.predict(np.zeros((1, 256, 256, 3), np.uint8))  # doctest: +SKIP
    """

    def __init__(self, model, *, providers=None, threads: int | None = None,
                 precision: str | None = None) -> None:
        spec = model if isinstance(model, ModelSpec) else load_spec(model)
        self.precision = resolve_precision(spec, precision, providers)
        self.weights_path = check_weights(spec, self.precision)
        self.spec = spec.for_precision(self.precision)  # e.g. the int8 network's threshold
        self.providers = providers
        self.threads = threads
        self.session = load_session(self.weights_path, providers=providers, threads=threads)
        self._check_signature()

    def __getstate__(self) -> dict:
        # sessions do not pickle: a dask worker reloads (and caches) its own
        return {"spec": self.spec, "providers": self.providers, "threads": self.threads,
                "precision": self.precision}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], providers=state["providers"], threads=state["threads"],
                      precision=state.get("precision"))

    def _check_signature(self) -> None:
        where = f"{self.weights_path}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.spec.input_name not in inputs:
            raise ModelError(
                f"{where}: model has no input {self.spec.input_name!r} (it has {sorted(inputs)})"
            )
        shape = inputs[self.spec.input_name].shape
        if len(shape) not in (4,):
            raise ModelError(f"{where}: input must be 4-D NCHW, the model's is {shape}")
        if isinstance(shape[1], int) and shape[1] != 3:
            raise ModelError(f"{where}: model expects {shape[1]} channels, the spec says RGB (3)")
        self._fixed_hw = tuple(s if isinstance(s, int) else None for s in shape[2:])
        names = self._have = {o.name for o in self.session.get_outputs()}
        # an output computed only on request (a fine-tune's ``features``) may be missing from
        # the int8 network: the fine-tune runs the float one; asking the int8 one fails below
        missing = {role: n for role, n in self.spec.outputs.items()
                   if n not in names and not (role in ON_REQUEST and self.precision == "int8")}
        if missing:
            raise ModelError(f"{where}: spec outputs {missing} not in the model's outputs {sorted(names)}")

    def predict(
        self, batch: np.ndarray, *, cancel: CancelToken | None = None, roles=None
    ) -> dict[str, np.ndarray]:
        """Run on ``(N, H, W, 3)`` uint8; returns role -> float32 array.

        ``roles``: the output roles to compute (default: all but those only computed on
        request, :data:`napari_hemato.core.spec.ON_REQUEST`, e.g. a heatmap net's ``features``).
        """
        import onnxruntime as ort

        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ModelError(f"{self.spec.name}: expected (N, H, W, 3) input, got {batch.shape}")
        for got, fixed in zip(batch.shape[1:3], self._fixed_hw, strict=True):
            if fixed is not None and got != fixed:
                raise ModelError(
                    f"{self.spec.name}: model takes {self._fixed_hw} px inputs, got {batch.shape[1:3]}"
                )
        feed = {self.spec.input_name: self.spec.normalize(batch)}
        if roles is None:
            roles = [r for r in self.spec.outputs if r not in ON_REQUEST]
        roles = list(roles)
        unknown = [r for r in roles if r not in self.spec.outputs or self.spec.outputs[r] not in self._have]
        if unknown:
            raise ModelError(f"{self.spec.name}: the model ({self.precision} network) has no output "
                             f"role(s) {unknown}")
        names = [self.spec.outputs[r] for r in roles]
        options = ort.RunOptions()
        unregister = cancel.register(lambda: setattr(options, "terminate", True)) if cancel else None
        try:
            outputs = self.session.run(names, feed, options)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail types
            if cancel is not None and cancel.cancelled:
                raise Cancelled("inference cancelled") from None
            raise ModelError(f"{self.spec.name}: inference failed ({str(err).splitlines()[0]})") from None
        finally:
            if unregister:
                unregister()
        return {
            role: np.asarray(out, dtype=np.float32)
            for role, out in zip(roles, outputs, strict=True)
        }
