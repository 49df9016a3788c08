"""Export a model folder as a bioimage.io model package (rdf.yaml format 0.5), Qt- and bioimageio-free.

The package is a zip holding ``rdf.yaml``, the ONNX weights, a test input and
the matching outputs as ``.npy`` (computed here with the package's own
onnxruntime session and normalisation), a cover image and the model card as
documentation. The rdf describes what the network itself takes and returns:

- input ``(batch, channel, y, x)`` float32 RGB on the 0..255 scale, with the
  spec's normalisation as ``fixed_zero_mean_unit_variance`` preprocessing; the
  space axes carry ``unit: micrometer`` and ``scale`` = the model's µm/px;
- one output per ONNX output, in the model's order, channel names = the class
  names for class outputs (``class_probs``, ``probs``, ``cam``), else the role;
- ``config.napari_hemato``: the whole model spec (post-processing, halo, tile,
  crop rules, ...) so that napari-hemato can run the package as it runs the folder.

Only the standard library, numpy, Pillow and PyYAML (napari's dependencies) are
needed to write a package; bioimageio.core is only needed to test one
(``bioimageio test PKG.zip``).

Examples
--------
>>> from napari_hemato.models.bioimageio import export_bioimageio
>>> export_bioimageio("nuclei", "nuclei.bioimageio.zip")  # doctest: +SKIP
PosixPath('nuclei.bioimageio.zip')
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from napari_hemato.core.errors import ModelError
from napari_hemato.core.spec import ON_REQUEST, ModelSpec, load_spec
from napari_hemato.models.onnx_opset import onnx_opset

__all__ = ["export_bioimageio"]

log = logging.getLogger(__name__)

FORMAT_VERSION = "0.5.4"
AUTHORS = [{"name": "napari-hemato developers"}]
NAPARI_DOI = "10.5281/zenodo.3555620"  # napari's own citation (napari's README)
LICENSE = "BSD-3-Clause"  # the project's licence; see the model card for the training data's
_CLASS_ROLES = ("class_probs", "probs", "cam", "logits")
# which bundled sample the test input is cut from, and the µm/px it is taken to have
_SAMPLES = {"nuclei": "he_slide", "mitosis": "he_slide", "smear": "smear_field",
            "wbc": "smear_field"}


def _test_image(spec: ModelSpec, shape: tuple[int, int]) -> np.ndarray:
    """A (1, H, W, 3) uint8 crop of a bundled sample, resampled to the model's µm/px.

    Tiled models get the sample's centre; a crop classifier gets a square around
    the sample's darkest spot (a stained nucleus: the smear field's white cell).
    """
    from PIL import Image
    from scipy import ndimage

    from napari_hemato.core.slide import open_slide, to_rgb8
    from napari_hemato.samples import sample_path

    h, w = shape
    with open_slide(sample_path(_SAMPLES.get(spec.task, "he_slide"))) as slide:
        big_h, big_w = slide.shape
        if spec.kind == "classifier":
            grey = to_rgb8(np.asarray(slide.levels[-1])).mean(axis=-1)
            f = big_h / grey.shape[0]
            smooth = ndimage.uniform_filter(grey, max(3, grey.shape[0] // 20))
            cy, cx = (int(v * f) for v in np.unravel_index(np.argmin(smooth), smooth.shape))
            sh = sw = max(1, int(0.4 * min(big_h, big_w)))
        else:
            have = slide.mpp or spec.assumed_input_mpp or spec.mpp
            factor = (spec.mpp / have) if spec.mpp and have else 1.0
            sh, sw = (min(max(1, round(v * factor)), big) for v, big in ((h, big_h), (w, big_w)))
            cy, cx = big_h // 2, big_w // 2
        y0, x0 = min(max(cy - sh // 2, 0), big_h - sh), min(max(cx - sw // 2, 0), big_w - sw)
        rgb = to_rgb8(slide.read_region(0, y0, x0, y0 + sh, x0 + sw))
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    return rgb[None]


def _test_shape(spec: ModelSpec, session) -> tuple[int, int]:
    fixed = session.get_inputs()[0].shape[2:]
    if all(isinstance(v, int) for v in fixed):
        return int(fixed[0]), int(fixed[1])
    if spec.input_size:
        return int(spec.input_size), int(spec.input_size)
    side = max(spec.size_divisor * int(np.ceil(128 / spec.size_divisor)), spec.size_divisor)
    return side, side


def _space_axes(spec: ModelSpec, sizes) -> list[dict]:
    unit = {"unit": "micrometer", "scale": float(spec.mpp)} if spec.mpp else {}
    return [{"type": "space", "id": ax, "size": size, **unit} for ax, size in zip("yx", sizes, strict=True)]


def _channel_names(spec: ModelSpec, role: str, n: int) -> list[str]:
    if role in _CLASS_ROLES and len(spec.class_names) == n:
        return [str(c) for c in spec.class_names]
    return [role] if n == 1 else [f"{role}_{k}" for k in range(n)]


def _output_axes(spec: ModelSpec, role: str, value: np.ndarray, input_shape, input_id: str,
                 fixed_input: bool) -> list[dict]:
    axes = [{"type": "batch"}, {"type": "channel", "channel_names": _channel_names(spec, role,
                                                                                   value.shape[1])}]
    if value.ndim == 2:
        return axes
    if value.ndim != 4:
        raise ModelError(f"{spec.name}: output {role} is {value.ndim}-D; expected (N, C) or NCHW")
    if tuple(value.shape[2:]) == tuple(input_shape) and not fixed_input:
        sizes = [{"tensor_id": input_id, "axis_id": ax} for ax in "yx"]
        return axes + _space_axes(spec, sizes)
    sizes = [int(v) for v in value.shape[2:]]
    out = _space_axes(spec, sizes)
    for ax, n_in, n_out in zip(out, input_shape, sizes, strict=True):
        if "scale" in ax:
            ax["scale"] = float(spec.mpp) * n_in / n_out
    return axes + out


def _cover(image: np.ndarray, outputs: list[tuple[str, np.ndarray]]) -> bytes:
    """A 2:1 PNG: the test input beside its first spatial output channel (or the input twice)."""
    from PIL import Image

    left = Image.fromarray(image[0])
    right = left
    for _, value in outputs:
        if value.ndim == 4:
            plane = value[0, 0]
            lo, hi = float(plane.min()), float(plane.max())
            grey = np.zeros(plane.shape, np.uint8) if hi <= lo else \
                np.rint(255 * (plane - lo) / (hi - lo)).astype(np.uint8)
            right = Image.fromarray(grey).convert("RGB").resize(left.size, Image.Resampling.NEAREST)
            break
    side = 256
    canvas = Image.new("RGB", (2 * side, side), "white")
    canvas.paste(left.resize((side, side), Image.Resampling.BILINEAR), (0, 0))
    canvas.paste(right.resize((side, side), Image.Resampling.NEAREST), (side, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _card(spec: ModelSpec) -> str:
    card = spec.folder / "MODEL_CARD.md" if spec.folder else None
    if card is not None and card.is_file():
        return card.read_text(encoding="utf-8")
    return (f"# {spec.name} {spec.version}\n\nA napari-hemato {spec.task} model ({spec.kind}); "
            f"classes: {', '.join(spec.class_names)}.\n\nThis folder shipped no MODEL_CARD.md: "
            "see config.napari_hemato in rdf.yaml for its spec.\n")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _resolve(model) -> ModelSpec:
    from napari_hemato.models.registry import bundled_models

    if isinstance(model, ModelSpec):
        return model
    path = Path(model)
    if not path.exists() and str(model) in bundled_models():
        path = bundled_models()[str(model)]
    return load_spec(path)


def _packaged_onnx(spec: ModelSpec) -> bytes:
    """The float network as packaged: without the outputs only fine-tuning asks for
    (:data:`~napari_hemato.core.spec.ON_REQUEST`, Identity nodes), which other tools would
    run and describe as the model's outputs."""
    data = spec.onnx_path.read_bytes()
    drop = {spec.outputs[r] for r in ON_REQUEST if r in spec.outputs}
    if not drop:
        return data
    import onnx

    model = onnx.load_from_string(data)
    keep = [o for o in model.graph.output if o.name not in drop]
    nodes = [n for n in model.graph.node if not (n.op_type == "Identity" and set(n.output) <= drop)]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_rdf(spec: ModelSpec, *, test_input: np.ndarray, outputs: list[tuple[str, np.ndarray]],
              hashes: dict[str, str], opset: int, fixed_input: bool,
              license: str = LICENSE) -> dict:
    """The rdf.yaml content (a plain dict) for ``spec`` and its test tensors."""
    input_id = spec.input_name
    h, w = test_input.shape[2:]
    if fixed_input:
        sizes = [int(h), int(w)]
    else:
        step = int(spec.size_divisor)
        sizes = [{"min": step * int(np.ceil(64 / step)), "step": step} for _ in "yx"]
    norm = spec.normalization
    scale = float(norm.get("scale", 1 / 255))
    mean = [float(m) / scale for m in norm.get("mean", [0.0, 0.0, 0.0])]
    std = [float(s) / scale for s in norm.get("std", [1.0, 1.0, 1.0])]
    described = {role: name for role, name in spec.outputs.items()}
    out_descr = []
    for name, value in outputs:
        role = next((r for r, n in described.items() if n == name), name)
        out_descr.append({
            "id": _tensor_id(name),
            "description": f"{role} output" + (f" (classes {', '.join(spec.class_names)})"
                                               if role in _CLASS_ROLES else ""),
            "axes": _output_axes(spec, role, value, (h, w), input_id, fixed_input),
            "test_tensor": {"source": f"test_output_{_tensor_id(name)}.npy",
                            "sha256": hashes[f"test_output_{_tensor_id(name)}.npy"]},
            "data": {"type": "float32"},
        })
    config = spec.to_dict()
    config["halo_px"] = spec.halo
    config["rgb_input"] = "float32 on the 0..255 scale, RGB, white (pad_value) outside the image"
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": spec.name,
        "version": spec.version,
        "description": (f"napari-hemato {spec.task} model ({spec.kind}): {', '.join(spec.class_names)}"
                        + (f" at {spec.mpp} µm/px" if spec.mpp else " on size-normalised cell crops")
                        + ". Post-processing (instances, points, crop rules) is in "
                          "config.napari_hemato and napari-hemato."),
        "authors": AUTHORS,
        "cite": _cite(spec),
        "license": license,
        "documentation": "MODEL_CARD.md",
        "covers": ["cover.png"],
        "tags": ["napari-hemato", spec.task, spec.kind, "onnx", "histology" if spec.mpp else "cells",
                 "2d"],
        "inputs": [{
            "id": _tensor_id(input_id),
            # (at most 128 characters)
            "description": "RGB image, 0..255" + (
                ", colour-matched first (config.napari_hemato.preprocess.colour_match)"
                if spec.preprocess.get("colour_match") else ""),
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["R", "G", "B"]},
                     *_space_axes(spec, sizes)],
            "test_tensor": {"source": "test_input.npy", "sha256": hashes["test_input.npy"]},
            "data": {"type": "float32", "range": [0.0, 255.0]},
            "preprocessing": [{"id": "fixed_zero_mean_unit_variance",
                               "kwargs": {"mean": mean, "std": std, "axis": "channel"}}],
        }],
        "outputs": out_descr,
        "weights": {"onnx": {"source": "model.onnx", "sha256": hashes["model.onnx"],
                             "opset_version": int(opset), "authors": AUTHORS}},
        "config": {"bioimageio": {"reproducibility_tolerance": [
                       {"output_ids": [o["id"]], "relative_tolerance": 1e-3,
                        "absolute_tolerance": _abs_tolerance(value)}
                       for o, (_, value) in zip(out_descr, outputs, strict=True)]},
                   "napari_hemato": config},
    }


def _abs_tolerance(value: np.ndarray) -> float:
    """1e-3, or less for outputs whose test values are small (bioimageio allows 1 % of the max)."""
    peak = float(np.max(np.abs(value))) if value.size else 0.0
    return float(min(1e-3, 0.005 * peak))


def _cite(spec: ModelSpec) -> list[dict]:
    cites = spec.extra.get("cite") if isinstance(spec.extra.get("cite"), list) else None
    if cites:
        return [dict(c) for c in cites]
    return [{"text": f"napari-hemato {spec.name} {spec.version}, a model of the napari-hemato "
                     "napari plugin (its training data and their references are in the model "
                     "card, MODEL_CARD.md); napari contributors (2019). napari: a "
                     "multi-dimensional image viewer for Python",
             "doi": NAPARI_DOI}]


def _no_aliases_dumper():
    import yaml

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return NoAliases


def _tensor_id(name: str) -> str:
    import re

    tid = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "tensor"
    return tid[:32]


def export_bioimageio(model, out: str | os.PathLike, *, overwrite: bool = False,
                      license: str = LICENSE, providers=None) -> Path:
    """Write ``model`` (a model folder, or a bundled task name) as a bioimage.io package zip.

    Parameters
    ----------
    model : path, str or ModelSpec
        A model folder (``model.onnx`` + ``model.json``), or a task with a bundled model.
    out : path
        The ``.zip`` to write.
    overwrite : bool
        Replace an existing file.
    license : str
        SPDX licence identifier of the package (default: the project's).
    providers : optional
        onnxruntime providers for computing the test outputs (default CPU).

    Returns
    -------
    Path
        The package written.

    Examples
    --------
    >>> export_bioimageio("nuclei", "nuclei.zip")  # doctest: +SKIP
    PosixPath('nuclei.zip')
    """
    import yaml

    from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
    from napari_hemato.models.onnx_backend import OnnxPredictor

    spec = _resolve(model)
    try:
        dest = check_destination(out, overwrite=overwrite)
    except ExportError as exc:
        raise ModelError(str(exc)) from None
    # the packaged network is the float one, without the outputs only fine-tuning asks for
    import onnxruntime as ort

    predictor = OnnxPredictor(spec, providers=providers, precision="float")  # checks the weights
    network = _packaged_onnx(spec)
    session = ort.InferenceSession(network, providers=predictor.session.get_providers())
    fixed_input = all(isinstance(v, int) for v in session.get_inputs()[0].shape[2:])
    image = _test_image(spec, _test_shape(spec, session))
    network_spec = spec
    if spec.preprocess.get("colour_match"):
        # not a bioimage.io preprocessing: the package takes images already colour-matched
        # (its input's description says so; config.napari_hemato keeps the parameters), and its
        # test input is one
        from dataclasses import replace

        from napari_hemato.core.colour_match import match_colour

        image = np.stack([match_colour(im, spec.preprocess["colour_match"]) for im in image])
        network_spec = replace(spec, preprocess={k: v for k, v in spec.preprocess.items() if k != "colour_match"})
    feed = {spec.input_name: network_spec.normalize(image)}
    names = [o.name for o in session.get_outputs()]
    values = [np.asarray(v, np.float32) for v in session.run(names, feed)]
    outputs = list(zip(names, values, strict=True))
    if len({_tensor_id(n) for n in names}) != len(names):
        raise ModelError(f"{spec.name}: output names {names} do not give distinct tensor ids")
    test_input = np.ascontiguousarray(image.transpose(0, 3, 1, 2).astype(np.float32))
    files = {"model.onnx": network, "test_input.npy": _npy(test_input),
             "cover.png": _cover(image, outputs), "MODEL_CARD.md": _card(spec).encode("utf-8")}
    for name, value in outputs:
        files[f"test_output_{_tensor_id(name)}.npy"] = _npy(value)
    hashes = {name: _sha(data) for name, data in files.items()}
    rdf = build_rdf(spec, test_input=test_input, outputs=outputs, hashes=hashes,
                    opset=onnx_opset(spec.onnx_path), fixed_input=fixed_input, license=license)
    files["rdf.yaml"] = yaml.dump(rdf, Dumper=_no_aliases_dumper(), sort_keys=False,
                                  allow_unicode=True).encode("utf-8")
    try:
        with atomic_outputs([dest], overwrite=overwrite) as (tmp,):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in ("rdf.yaml", *sorted(set(files) - {"rdf.yaml"})):
                    zf.writestr(name, files[name])
    except ExportError as exc:
        raise ModelError(str(exc)) from None
    log.info("wrote bioimage.io package %s (%s %s)", dest, spec.name, spec.version)
    return dest
