"""Tiny ONNX models built in tests (no torch): local, like a real conv net."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.spec import ModelSpec


def build_dark_blob_onnx(path: Path, *, radius: int = 2, channels: int = 3,
                         outputs=("fg",), level: float = 0.45) -> Path:
    """fg = sigmoid(20 * (box_blur(1 - mean(rgb)) - level)), per pixel.

    ``outputs`` names the output tensors (each is the same map); ``channels``
    sets the input channel count (3 = valid, anything else for mismatch tests).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = 2 * radius + 1
    w_mean = np.full((1, channels, 1, 1), -1.0 / channels, np.float32)
    w_blur = np.full((1, 1, k, k), 1.0 / (k * k), np.float32)
    inits = [
        numpy_helper.from_array(w_mean, "w_mean"),
        numpy_helper.from_array(np.array([1.0], np.float32), "b_mean"),
        numpy_helper.from_array(w_blur, "w_blur"),
        numpy_helper.from_array(np.array(20.0, np.float32), "gain"),
        numpy_helper.from_array(np.array(level, np.float32), "level"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w_mean", "b_mean"], ["dark"]),
        helper.make_node("Pad", ["dark", "pads"], ["padded"], mode="edge"),
        helper.make_node("Conv", ["padded", "w_blur"], ["blur"]),
        helper.make_node("Sub", ["blur", "level"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0, 0, radius, radius, 0, 0, radius, radius],
                                                  np.int64), "pads"))
    outs = []
    for name in outputs:
        if name == "probs":  # two classes: A = the foreground probability, B = its complement
            nodes.append(helper.make_node("Sub", ["one", "prob"], ["notprob"]))
            nodes.append(helper.make_node("Concat", ["prob", "notprob"], [name], axis=1))
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2, "H", "W"]))
            continue
        nodes.append(helper.make_node("Identity", ["prob"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, "H", "W"]))
    graph = helper.make_graph(
        nodes, "dark_blobs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        outs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def dark_blob_model_dir(folder: Path, **spec_overrides) -> Path:
    """A model folder (model.onnx + model.json) for the dark-blob ONNX model."""
    fields = dict(
        name="test-dark-blobs", version="0.0.1", task="nuclei", kind="instances",
        mpp=0.5, tile=128, max_object_um=20.0, receptive_field_px=2,
        class_names=("nucleus",), outputs={"foreground": "fg"},
        postprocess={"threshold": 0.5, "min_distance_um": 2.0, "min_area_um2": 4.0},
    )
    fields.update(spec_overrides)
    spec = ModelSpec(**fields)
    build_dark_blob_onnx(folder / "model.onnx", outputs=tuple(sorted(set(spec.outputs.values()))))
    spec.save(folder)
    return folder
