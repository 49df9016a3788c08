"""Int8 weights and activations for a dense ONNX model, calibrated on its training images.

Static QDQ quantization (onnxruntime's ``quantize_static``): weights int8 per output
channel, activations uint8 with ranges measured on calibration crops (min/max). The
last convolution(s), which make the output maps, stay float so that the
foreground and distance maps keep their resolution near the thresholds the
post-processing cuts at. Int8 convolutions run about 1.5× faster on CPUs with
AVX2/AVX-512 VNNI (measured in the model card).

The int8 network is written *beside* the float one (``model_int8.onnx``, named in the
spec's ``int8`` entry with its own sha256; ``extra.quantization`` says how it was made):
the CPU runs it by default, a GPU, export and fine-tuning keep the float reference
(:func:`napari_hemato.models.onnx_backend.resolve_precision`).

Calibration crops come from the model's *training* images only (every image listed in
``extra.validation_images`` or ``extra.tune_images`` is left out), and the quantized
model is scored afterwards on the held-out images like any other (``evaluate nuclei``).

A build-time tool: it needs ``onnx`` (the ``train`` extra), not torch. Usage::

    python -m napari_hemato.train.quantize --model MODEL_DIR --data ../shared/data [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from napari_hemato.core.spec import ModelSpec, load_spec, write_spec

log = logging.getLogger("napari_hemato.train.quantize")


def calibration_crops(images: list[np.ndarray], n: int = 48, size: int = 256,
                      seed: int = 0) -> list[np.ndarray]:
    """``n`` random ``size``² uint8 RGB crops spread over ``images`` (smaller images padded white).

    Examples
    --------
    >>> imgs = [np.zeros((300, 400, 3), np.uint8), np.zeros((100, 120, 3), np.uint8)]
    >>> [c.shape for c in calibration_crops(imgs, n=3, size=128)]
    [(128, 128, 3), (128, 128, 3), (128, 128, 3)]
    """
    rng = np.random.default_rng(seed)
    crops = []
    for k in range(n):
        img = images[k % len(images)]
        h, w = img.shape[:2]
        if h < size or w < size:
            img = np.pad(img, ((0, max(size - h, 0)), (0, max(size - w, 0)), (0, 0)),
                         constant_values=255)
            h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(np.ascontiguousarray(img[y : y + size, x : x + size, :3]))
    return crops


def output_convs(model_path: str | Path, depth: int = 1) -> list[str]:
    """Names of the Conv nodes within ``depth`` Conv steps of the graph's outputs."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    producer = {o: node for node in graph.node for o in node.output}
    names: list[str] = []
    frontier = [o.name for o in graph.output]
    seen: set[str] = set()
    convs_left = {name: depth for name in frontier}
    while frontier:
        tensor = frontier.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        left = convs_left[tensor]
        if node.op_type == "Conv":
            names.append(node.name)
            left -= 1
        if left <= 0:
            continue
        for inp in node.input:
            if inp in producer and producer[inp].op_type != "Constant":  # not weights
                convs_left[inp] = max(convs_left.get(inp, 0), left)
                frontier.append(inp)
    return names


def quantize_model(model_path: str | Path, out_path: str | Path, spec: ModelSpec,
                   crops: list[np.ndarray], *, keep_float: list[str]) -> None:
    """Write the int8 (QDQ) version of ``model_path`` to ``out_path``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{spec.input_name: spec.normalize(c[None])} for c in crops])

        def get_next(self):
            return next(self._it, None)

    model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its scratch files
        pre = Path(tmp) / "pre.onnx"
        # symbolic shape inference cannot follow the dynamic Resize sizes of a U-Net
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=list(keep_float))


def nuclei_calibration(spec: ModelSpec, data_dir: str | Path, n: int) -> tuple[list, dict]:
    """``n`` crops of the nucleus model's training images at its pixel size (validation and
    tune images left out), and what they are."""
    from napari_hemato.train import data_nuclei as dn

    held = {e["key"] for which in ("validation_images", "tune_images")
            for e in spec.extra.get(which, [])}
    keys = [k for k in dn.list_keys(data_dir) if k not in held]
    images = [dn.load_image(data_dir, k, targets=False).image for k in keys]
    return calibration_crops(images, n=n), {
        "images": len(keys), "split": "training images only (validation and tune images left out)"}


INT8_FILE = "model_int8.onnx"


def add_int8(model_dir: str | Path, crops: list[np.ndarray], *, keep_float_depth: int = 1,
             version: str | None = None, calibration: dict | None = None) -> Path:
    """Write ``model_int8.onnx`` beside the float network of ``model_dir``, calibrated on
    ``crops`` (uint8 RGB at the model's pixel size), and name it in ``model.json``."""
    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    keep = output_convs(spec.onnx_path, keep_float_depth)
    quantize_model(spec.onnx_path, model_dir / INT8_FILE, spec, crops, keep_float=keep)
    raw = json.loads((model_dir / "model.json").read_text())
    raw["int8"] = {"onnx": INT8_FILE}
    if version:
        raw["version"] = version
    raw.setdefault("extra", {})["quantization"] = {
        "method": "onnxruntime quantize_static, QDQ, weights int8 per channel, "
                  "activations uint8, min/max calibration",
        "float_nodes": keep,
        "calibration": {"crops": len(crops), "crop_px": int(crops[0].shape[0]), "seed": 0,
                        **(calibration or {})},
    }
    write_spec(model_dir, raw)
    log.info("%s: int8 network written (%d calibration crops; float: %s)",
             model_dir / INT8_FILE, len(crops), ", ".join(keep))
    return model_dir


def mitosis_calibration(spec: ModelSpec, data_dir: str | Path, n: int) -> tuple[list, dict]:
    """``n`` crops of the mitosis detector's training material at its pixel size, half
    negative tissue (its training parts) and half figures (AMi-Br and points crops of the
    training slides, by training's own split; crops smaller than 256 px are used whole)."""
    from napari_hemato.train import data_mitosis as dm

    regions = dm.tissue_regions(data_dir, part="train", mpp=spec.mpp)
    frame = dm.read_crops_table(data_dir)
    points = dm.load_points_crops(data_dir, mpp=spec.mpp)
    slides = np.concatenate([frame["slide"].to_numpy(object), points.slides])
    datasets = np.concatenate([frame["dataset"].astype(str).to_numpy(object), points.datasets])
    split = dm.split_slides(slides, datasets)  # what train_mitosis splits (load_data)
    train = np.flatnonzero(np.isin(slides, split["train"]))
    pick = np.random.default_rng(0).permutation(train)[: n // 2]
    rows = np.sort(pick[pick < len(frame)])
    figures = list(dm.load_crops(frame.iloc[rows], mpp=spec.mpp).images)
    figures += list(points.images[np.sort(pick[pick >= len(frame)]) - len(frame)])
    side = min(min(f.shape[:2]) for f in figures) // spec.size_divisor * spec.size_divisor
    crops = (calibration_crops([r.image for r in regions], n=n - len(figures))
             + calibration_crops(figures, n=len(figures), size=side))
    return crops, {"tissue_regions": len(regions), "figure_crops": len(figures),
                   "figure_crop_px": int(side), "training_slides": len(split["train"]),
                   "split": "training slides and training tissue parts only"}


CALIBRATION = {"nuclei": nuclei_calibration, "mitosis": mitosis_calibration}


def quantize_folder(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
                    *, n_crops: int = 48, keep_float_depth: int = 1,
                    version: str | None = None) -> Path:
    """Add an int8 network to the nucleus or mitosis model folder ``model_dir`` (or to a copy
    of it in ``out_dir``), calibrated on its training images (see module docstring)."""
    spec = load_spec(model_dir)
    if spec.task not in CALIBRATION:
        raise ValueError(f"{model_dir}: calibration images are known for {sorted(CALIBRATION)} "
                         f"models, not {spec.task!r}")
    crops, calibration = CALIBRATION[spec.task](spec, data_dir, n_crops)
    if out_dir is not None and Path(out_dir).resolve() != Path(model_dir).resolve():
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        model_dir = out_dir
    return add_int8(model_dir, crops, keep_float_depth=keep_float_depth, version=version,
                    calibration=calibration)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="float model folder")
    parser.add_argument("--data", required=True, help="the shared data folder (calibration images)")
    parser.add_argument("--out", help="write into a copy of the model folder here (default: "
                                      "add the int8 network to MODEL_DIR itself)")
    parser.add_argument("--crops", type=int, default=48)
    parser.add_argument("--keep-float-depth", type=int, default=1,
                        help="convolutions from the outputs kept in float (default 1)")
    parser.add_argument("--version", help="new version of the model (default: unchanged)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quantize_folder(args.model, args.data, args.out, n_crops=args.crops,
                    keep_float_depth=args.keep_float_depth, version=args.version)


if __name__ == "__main__":
    main()
