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


def tiny_wbc_model_dir(folder: Path, *, size: int = 32, seed: int = 0, temperature: float = 0.8) -> Path:
    """A classifier with the bundled WBC model's head layout, in a few nodes (no torch).

    image -> 4x4 average pool -> 1x1 conv to 8 features + ReLU (the "trunk") ->
    mean over space (the embedding) -> Gemm(transB=1) -> / T -> Softmax = probs;
    cam = the Gemm's weights x the feature map + bias / 16 (as the real export).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from napari_hemato.core.spec import write_spec
    from napari_hemato.models.cell_classifier import CLASS_NAMES

    rng = np.random.default_rng(seed)
    n_cls, dim, k = len(CLASS_NAMES), 8, size // 4
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (dim, 3, 1, 1)).astype(np.float32), "trunk_w"),
        numpy_helper.from_array(rng.normal(0, 1, (n_cls, dim)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, n_cls).astype(np.float32), "fc.bias"),
        numpy_helper.from_array(np.array(temperature, np.float32), "temperature"),
        numpy_helper.from_array(np.array([1, n_cls, 1, 1], np.int64), "bias_shape"),
        numpy_helper.from_array(np.array(16, np.float32), "hw"),  # the 4 x 4 feature map
    ]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Conv", ["pooled", "trunk_w"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["fmap"]),
        helper.make_node("ReduceMean", ["fmap"], ["emb"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["emb", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=1),
        helper.make_node("Einsum", ["fc.weight", "fmap"], ["cam_w"], equation="cd,ndhw->nchw"),
        helper.make_node("Div", ["fc.bias", "hw"], ["bias_hw"]),
        helper.make_node("Reshape", ["bias_hw", "bias_shape"], ["bias_4d"]),
        helper.make_node("Add", ["cam_w", "bias_4d"], ["cam"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wbc_head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_cls]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", n_cls, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_spec(folder, {"name": "tiny-wbc", "version": "0", "task": "wbc", "kind": "classifier",
                        "class_names": list(CLASS_NAMES), "outputs": {"probs": "probs", "cam": "cam"},
                        "input_size": size, "tile": size, "mpp": None,
                        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                        "preprocess": {"context": 1.5}})
    return folder


def tiny_mitosis_model_dir(folder: Path, *, seed: int | None = None, gain: float = 15.0) -> Path:
    """A heatmap net with the bundled mitosis model's head layout, in a few nodes (no torch).

    image -> 1×1 conv to 6 colour features (darkness, red − blue, blue − red, green,
    brightness, a constant) + ReLU -> 4×4 average pool -> 3×3 box blur per channel + ReLU
    (the "features", stride 4) -> 1×1 conv to 3 channels -> linear ×4 upsampling ->
    channel 0: Sigmoid = heatmap (``gain`` × darkness − 4: any dark blob is a "figure"),
    channels 1-2: Softmax = class_probs (normal ~ blue, atypical ~ red). ``seed`` adds
    noise to the trunk (another model with the same head layout).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from napari_hemato.core.spec import write_spec

    d = 6
    w1 = np.zeros((d, 3, 1, 1), np.float32)
    w1[0, :, 0, 0] = -1 / 3  # darkness
    w1[1, :, 0, 0] = [1, 0, -1]  # red - blue
    w1[2, :, 0, 0] = [-1, 0, 1]  # blue - red
    w1[3, :, 0, 0] = [-0.5, 1, -0.5]  # green
    w1[4, :, 0, 0] = 1 / 3  # brightness
    b1 = np.array([0, 0, 0, 0, 0, 1], np.float32)  # channel 5: the constant 1
    if seed is not None:
        w1 = w1 + np.random.default_rng(seed).normal(0, 0.2, w1.shape).astype(np.float32)
    blur = np.zeros((d, d, 3, 3), np.float32)
    for c in range(d):
        blur[c, c] = 1 / 9
    w_out = np.zeros((3, d, 1, 1), np.float32)
    w_out[0, 0, 0, 0] = gain
    w_out[1, 2, 0, 0] = w_out[2, 1, 0, 0] = 4.0
    b_out = np.array([-4.0, 0.0, 0.0], np.float32)
    c = lambda v, n: numpy_helper.from_array(np.array(v, np.int64 if isinstance(v[0], int) else np.float32), n)  # noqa: E731
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(blur, "blur"), numpy_helper.from_array(w_out, "head.weight"),
             numpy_helper.from_array(b_out, "head.bias"), c([1.0, 1.0, 4.0, 4.0], "scales"),
             c([0], "s0"), c([1], "s1"), c([3], "s3"), c([1], "axis")]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["colours"]),
        helper.make_node("Relu", ["colours"], ["colours_r"]),
        helper.make_node("AveragePool", ["colours_r"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "blur"], ["blurred"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["blurred"], ["feat"]),
        helper.make_node("Conv", ["feat", "head.weight", "head.bias"], ["logits_small"]),
        helper.make_node("Resize", ["logits_small", "", "scales"], ["logits"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Slice", ["logits", "s0", "s1", "axis"], ["heat_logit"]),
        helper.make_node("Sigmoid", ["heat_logit"], ["heatmap"]),
        helper.make_node("Slice", ["logits", "s1", "s3", "axis"], ["class_logits"]),
        helper.make_node("Softmax", ["class_logits"], ["class_probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mitosis",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 1, "H", "W"]),
         helper.make_tensor_value_info("class_probs", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_spec(folder, {"name": "tiny-mitosis", "version": "0", "task": "mitosis", "kind": "points",
                        "class_names": ["normal", "atypical"],
                        "outputs": {"heatmap": "heatmap", "class_probs": "class_probs"},
                        "mpp": 0.5, "tile": 256, "max_object_um": 10.0, "receptive_field_px": 12,
                        "size_divisor": 4, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                        "postprocess": {"threshold": 0.6, "min_distance_um": 4.0, "radius_um": 3.0}})
    return folder
