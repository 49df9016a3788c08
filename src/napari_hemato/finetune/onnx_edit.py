"""Small, checked edits of an ONNX graph: expose a tensor, replace weights, find a head.

The fine-tuned model is the shipped graph with new weights in its last layer (and,
for detectors, a rescoring layer added): ``analyze`` and ``classify-cells`` run it
like any other model. Uses the ``onnx`` package (protobuf only; no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from napari_hemato.core.errors import ModelError


def load(path) -> onnx.ModelProto:
    return onnx.load(str(path))


def save(model: onnx.ModelProto, path) -> None:
    """Check and write a single-file model (no external data)."""
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=False)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise ModelError(f"the ONNX graph has no initializer {name!r}")


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace initializer ``name`` by ``value`` (same shape and dtype)."""
    for k, init in enumerate(model.graph.initializer):
        if init.name == name:
            old = numpy_helper.to_array(init)
            value = np.asarray(value, dtype=old.dtype)
            if value.shape != old.shape:
                raise ModelError(f"initializer {name!r}: shape {value.shape} != {old.shape}")
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise ModelError(f"the ONNX graph has no initializer {name!r}")


def add_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    if any(init.name == name for init in model.graph.initializer):
        set_initializer(model, name, value)
    else:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def expose(model: onnx.ModelProto, tensor: str, as_name: str) -> None:
    """Make the internal ``tensor`` a graph output called ``as_name`` (an Identity node)."""
    if as_name in output_names(model):
        return
    produced = {o for node in model.graph.node for o in node.output}
    if tensor not in produced:
        raise ModelError(f"the ONNX graph computes no tensor {tensor!r}")
    rank = _rank(model, tensor)
    model.graph.node.append(helper.make_node("Identity", [tensor], [as_name],
                                             name=f"expose_{as_name}"))
    model.graph.output.append(helper.make_tensor_value_info(
        as_name, TensorProto.FLOAT, [f"{as_name}_{k}" for k in range(rank)]))


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    """The rank of an internal tensor (ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    raise ModelError(f"the rank of tensor {tensor!r} is unknown (ONNX shape inference)")


def elementwise_softmax(model: onnx.ModelProto) -> int:
    """Rewrite each Softmax over a non-last axis (class maps, NCHW axis 1) as
    ``Exp(x - max) / sum`` with ReduceMax/ReduceSum over that axis; returns how many.

    The same function: outputs agree within float rounding (3e-8 on the mitosis detector's
    class maps). onnxruntime's Softmax on axis 1 of an (N, C, H, W) tensor works on a
    transposed copy; the mitosis detector spent 20 % of its time there, and with this
    rewrite the network runs 17 % faster. Opset 13+ (ReduceSum takes its axes as an input).
    """
    count = 0
    for node in list(model.graph.node):
        if node.op_type != "Softmax":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        try:
            rank = _rank(model, node.input[0])
        except ModelError:  # unknown rank: leave it as it is
            continue
        if axis in (-1, rank - 1):
            continue
        x, y, tag = node.input[0], node.output[0], node.name or f"softmax{count}"
        axes = f"{tag}/axes"
        add_initializer(model, axes, np.array([axis], np.int64))
        new = [helper.make_node("ReduceMax", [x], [f"{tag}/max"], axes=[axis], keepdims=1,
                                name=f"{tag}/max"),
               helper.make_node("Sub", [x, f"{tag}/max"], [f"{tag}/shift"], name=f"{tag}/sub"),
               helper.make_node("Exp", [f"{tag}/shift"], [f"{tag}/exp"], name=f"{tag}/exp"),
               helper.make_node("ReduceSum", [f"{tag}/exp", axes], [f"{tag}/sum"], keepdims=1,
                                name=f"{tag}/sum"),
               helper.make_node("Div", [f"{tag}/exp", f"{tag}/sum"], [y], name=f"{tag}/div")]
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for k, n in enumerate(new):
            model.graph.node.insert(at + k, n)
        count += 1
    return count


def producer(model: onnx.ModelProto, tensor: str):
    for node in model.graph.node:
        if tensor in node.output:
            return node
    return None


def consumers(model: onnx.ModelProto, tensor: str) -> list:
    return [node for node in model.graph.node if tensor in node.input]


@dataclass
class LinearHead:
    """Where a classifier's last layer lives in the graph."""

    embedding: str  # the Gemm's input tensor (N, D)
    weight: str  # initializer (C, D)
    bias: str  # initializer (C,)
    temperature: float  # the constant the logits are divided by before the softmax (1 if none)


def find_linear_head(model: onnx.ModelProto, probs_output: str = "probs") -> LinearHead:
    """The Gemm feeding ``probs_output`` through (optionally) a Div by a constant and a Softmax."""
    node = producer(model, probs_output)
    if node is None or node.op_type != "Softmax":
        raise ModelError(f"output {probs_output!r} is not a Softmax: no linear head to refit")
    temperature = 1.0
    node = producer(model, node.input[0])
    if node is not None and node.op_type == "Div":
        temperature = float(_constant(model, node.input[1]))
        node = producer(model, node.input[0])
    if node is None or node.op_type != "Gemm":
        raise ModelError("no Gemm before the softmax: no linear head to refit")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
        raise ModelError("the head's Gemm is not x @ W.T + b")
    return LinearHead(node.input[0], node.input[1], node.input[2], temperature)


def _constant(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == tensor:
            return numpy_helper.to_array(init)
    node = producer(model, tensor)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    raise ModelError(f"{tensor!r} is not a constant")


def set_constant(model: onnx.ModelProto, tensor: str, value) -> None:
    """Replace the value of a Constant node's output or of an initializer."""
    node = producer(model, tensor)
    if node is not None and node.op_type == "Constant":
        old = numpy_helper.to_array(node.attribute[0].t)
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(value, old.dtype).reshape(old.shape)))
        return
    set_initializer(model, tensor, value)


@dataclass
class HeatmapHead:
    """Where a heatmap net's last layer lives: a 1×1 Conv over ``features``, whose
    output channel ``channel`` is (optionally upsampled linearly by ``upsample``,
    then) the heatmap's logit."""

    features: str  # the Conv's input tensor (N, D, h, w)
    weight: str  # initializer (K, D, 1, 1)
    bias: str  # initializer (K,)
    channel: int  # the Conv output channel that is the heatmap logit
    upsample: int  # integer linear (half-pixel) upsampling from the features to the heatmap


def _channel_range(model: onnx.ModelProto, node) -> tuple[int, int]:
    """The channels ``[start, end)`` a Slice node takes on axis 1 (step 1), else an error."""
    starts, ends = (int(np.ravel(_constant(model, node.input[k]))[0]) for k in (1, 2))
    axes = int(np.ravel(_constant(model, node.input[3]))[0]) if len(node.input) > 3 else 0
    steps = int(np.ravel(_constant(model, node.input[4]))[0]) if len(node.input) > 4 else 1
    if axes != 1 or steps != 1 or not 0 <= starts < ends:
        raise ModelError("the map is not a range of channels sliced from the last layer")
    return starts, ends


def _channel_slice(model: onnx.ModelProto, node) -> int:
    """The channel a Slice node takes: one channel (axis 1, step 1), else an error."""
    starts, ends = _channel_range(model, node)
    if ends != starts + 1:
        raise ModelError("the heatmap is not one channel sliced from the last layer")
    return starts


def _skip_identity(model: onnx.ModelProto, node):
    while node is not None and node.op_type == "Identity":
        node = producer(model, node.input[0])
    return node


def _conv_1x1(model: onnx.ModelProto, node, before: str, what: str) -> np.ndarray:
    """The weight (K, D, 1, 1) of ``node``, checked to be a 1×1 Conv with a bias that is a weight
    (``before`` and ``what`` name the map and the head in the errors)."""
    if node is None or node.op_type != "Conv" or len(node.input) < 3:
        raise ModelError(f"no Conv with a bias before {before}: no {what} to refit")
    weight = initializer(model, node.input[1])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if weight.shape[2:] != (1, 1) or attrs.get("group", 1) != 1 or any(v != 1 for v in attrs.get("strides", [1])):
        raise ModelError(f"the last layer before {before} is not a 1×1 convolution")
    initializer(model, node.input[2])  # the bias is a weight, not computed
    return weight


def find_heatmap_head(model: onnx.ModelProto, heatmap_output: str = "heatmap") -> HeatmapHead:
    """The 1×1 Conv feeding ``heatmap_output`` through [Resize] [Slice on channels] Sigmoid
    [Slice on channels] (the sigmoid is elementwise: slicing before or after it is the same;
    the nucleus segmenter slices its ``foreground`` and ``distance`` maps after it)."""
    node = _skip_identity(model, producer(model, heatmap_output))
    channel, upsample = None, 1
    if node is not None and node.op_type == "Slice":
        channel = _channel_slice(model, node)
        node = _skip_identity(model, producer(model, node.input[0]))
    if node is None or node.op_type != "Sigmoid":
        raise ModelError(f"output {heatmap_output!r} is not a Sigmoid: no heatmap head to refit")
    node = producer(model, node.input[0])
    if node is not None and node.op_type == "Slice":
        if channel is not None:
            raise ModelError("the heatmap is sliced twice: not a head this refit knows")
        channel = _channel_slice(model, node)
        node = producer(model, node.input[0])
    channel = 0 if channel is None else channel
    if node is not None and node.op_type == "Resize":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scales = np.ravel(_constant(model, node.input[2])) if len(node.input) > 2 and node.input[2] else []
        mode = attrs.get("mode", b"nearest")
        how = attrs.get("coordinate_transformation_mode", b"half_pixel")
        if (mode != b"linear" or how != b"half_pixel" or len(scales) != 4
                or list(scales[:2]) != [1, 1] or scales[2] != scales[3] or not float(scales[2]).is_integer()):
            raise ModelError("the heatmap's upsampling is not an integer linear half-pixel Resize")
        upsample = int(scales[2])
        node = producer(model, node.input[0])
    weight = _conv_1x1(model, node, "the heatmap's sigmoid", "heatmap head")
    if not 0 <= channel < weight.shape[0]:
        raise ModelError(f"heatmap channel {channel} is not an output of the last layer")
    return HeatmapHead(node.input[0], node.input[1], node.input[2], channel, upsample)


@dataclass
class ClassMapsHead:
    """Where a segmenter's per-pixel class probabilities come from: a softmax over channels
    ``[start, end)`` of a 1×1 Conv."""

    features: str  # the Conv's input tensor (N, D, H, W)
    weight: str  # initializer (K, D, 1, 1)
    bias: str  # initializer (K,)
    start: int
    end: int


def _softmax_input(model: onnx.ModelProto, node) -> str | None:
    """The logits a channel softmax reads: a Softmax node's input, or ``x`` of the
    :func:`elementwise_softmax` pattern ``Div(Exp(Sub(x, ReduceMax(x))), ReduceSum(...))``."""
    if node is None:
        return None
    if node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        return node.input[0] if axis == 1 else None
    if node.op_type != "Div":
        return None
    exp = producer(model, node.input[0])
    sub = producer(model, exp.input[0]) if exp is not None and exp.op_type == "Exp" else None
    if sub is None or sub.op_type != "Sub":
        return None
    peak = producer(model, sub.input[1])
    return sub.input[0] if peak is not None and peak.op_type == "ReduceMax" else None


def find_class_maps_head(model: onnx.ModelProto, probs_output: str = "class_probs") -> ClassMapsHead:
    """The 1×1 Conv whose channels a segmenter's ``probs_output`` is the softmax of
    (Conv → Slice on channels → Softmax over axis 1, or its elementwise form)."""
    logits = _softmax_input(model, _skip_identity(model, producer(model, probs_output)))
    if logits is None:
        raise ModelError(f"output {probs_output!r} is not a softmax over channels: no class head to refit")
    node = producer(model, logits)
    start = end = None
    if node is not None and node.op_type == "Slice":
        start, end = _channel_range(model, node)
        node = producer(model, node.input[0])
    weight = _conv_1x1(model, node, "the class softmax", "class head")
    start, end = (0, weight.shape[0]) if start is None else (start, min(end, weight.shape[0]))
    return ClassMapsHead(node.input[0], node.input[1], node.input[2], start, end)
