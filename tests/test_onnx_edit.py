"""Checked ONNX graph edits (finetune/onnx_edit.py): each edit keeps a valid, runnable graph
and refuses what would silently change another layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from napari_hemato.core.errors import ModelError
from napari_hemato.finetune import onnx_edit


def head_model(temperature: float | None = 2.0) -> onnx.ModelProto:
    """x (N, 3) -> Relu -> Gemm(W, b) [-> Div T] -> Softmax = probs."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) / 6, "W")
    b = numpy_helper.from_array(np.array([0.1, -0.1], np.float32), "b")
    nodes = [helper.make_node("Relu", ["x"], ["feat"]),
             helper.make_node("Gemm", ["feat", "W", "b"], ["logits"], transB=1)]
    last = "logits"
    if temperature is not None:
        nodes.append(helper.make_node("Constant", [], ["T"], value=numpy_helper.from_array(
            np.array(temperature, np.float32))))
        nodes.append(helper.make_node("Div", ["logits", "T"], ["scaled"]))
        last = "scaled"
    nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=1))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 2])],
                              initializer=[w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_find_the_head_expose_its_input_and_replace_its_weights():
    model = head_model()
    head = onnx_edit.find_linear_head(model)
    assert (head.embedding, head.weight, head.bias, head.temperature) == ("feat", "W", "b", 2.0)
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    probs_before = run(model, x)[0]
    onnx_edit.expose(model, head.embedding, "embedding")
    onnx_edit.expose(model, head.embedding, "embedding")  # twice: once
    assert onnx_edit.output_names(model) == ["probs", "embedding"]
    probs, emb = run(model, x)
    np.testing.assert_array_equal(probs, probs_before)  # exposing changes nothing
    np.testing.assert_array_equal(emb, np.maximum(x, 0))
    new_w = np.array([[0, 0, 1], [0, 0, -1]], np.float32)
    onnx_edit.set_initializer(model, "W", new_w)
    onnx_edit.set_initializer(model, "b", np.zeros(2))
    onnx_edit.set_constant(model, "T", 1.0)
    z = np.maximum(x, 0) @ new_w.T
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(run(model, x)[0], want, rtol=1e-6)
    onnx.checker.check_model(model)


def test_edits_that_would_break_the_graph_are_refused():
    model = head_model(temperature=None)
    assert onnx_edit.find_linear_head(model).temperature == 1.0
    with pytest.raises(ModelError, match="shape"):
        onnx_edit.set_initializer(model, "W", np.zeros((3, 3)))
    with pytest.raises(ModelError, match="no initializer"):
        onnx_edit.set_initializer(model, "nope", np.zeros(1))
    with pytest.raises(ModelError, match="computes no tensor"):
        onnx_edit.expose(model, "nope", "out")
    with pytest.raises(ModelError, match="not a Softmax"):
        onnx_edit.find_linear_head(model, "nope")
    onnx_edit.add_initializer(model, "extra", np.ones(2, np.float32))
    onnx_edit.add_initializer(model, "extra", np.zeros(2, np.float32))  # replaces
    np.testing.assert_array_equal(onnx_edit.initializer(model, "extra"), np.zeros(2))


def test_channel_softmax_becomes_elementwise_with_the_same_values(tmp_path):
    """A Softmax over the class axis of (N, C, H, W) maps is rewritten (onnxruntime runs
    it on a transposed copy); a classifier's Softmax over its last axis is left alone."""
    from tests.onnx_models import tiny_mitosis_model_dir, tiny_wbc_model_dir

    folder = tiny_mitosis_model_dir(tmp_path / "mitosis")
    model = onnx_edit.load(folder / "model.onnx")
    assert onnx_edit.elementwise_softmax(model) == 1
    assert onnx_edit.elementwise_softmax(model) == 0  # nothing left to rewrite
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    onnx_edit.save(model, tmp_path / "rewritten.onnx")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 48)).astype(np.float32)
    before = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(tmp_path / "rewritten.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in before.get_outputs()]
    for a, b in zip(before.run(names, {"image": x}), after.run(names, {"image": x}), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    classifier = onnx_edit.load(tiny_wbc_model_dir(tmp_path / "wbc") / "model.onnx")
    assert onnx_edit.elementwise_softmax(classifier) == 0
