"""A fixed small ONNX segmentation model for engine benchmarks (no training, no torch).

Five 3×3 convolutions (3→16→16→16→16→1 channels) at full resolution, with a
receptive field of 5 px: channel 0 carries a blurred "darkness" (hematoxylin
proxy) and the other channels fixed pseudo-random weights, so the model costs
about what a small U-Net does (~30 kFLOP per pixel) and its foreground is
real nuclei-like blobs on H&E (so post-processing does realistic work).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.spec import ModelSpec


def build(folder: Path, *, width: int = 16, depth: int = 4, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "image", 3
    for k in range(depth):
        w = rng.normal(0, 0.02, size=(width, cin, 3, 3)).astype(np.float32)
        if k == 0:
            w[0] = 0
            w[0, :, 1, 1] = -1.0 / 3  # darkness of the (normalised) RGB
        else:
            w[0] = 0
            w[0, 0] = 1.0 / 9  # box blur of channel 0
        b = np.zeros(width, np.float32)
        b[0] = 1.0 if k == 0 else 0.0
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"]))
        prev, cin = f"r{k}", width
    head = np.zeros((1, width, 3, 3), np.float32)
    head[0, 0, 1, 1] = 20.0
    head[0, 1:] = rng.normal(0, 0.01, size=(width - 1, 3, 3))
    inits += [numpy_helper.from_array(head, "wh"), numpy_helper.from_array(np.array([-9.0], np.float32), "bh")]
    nodes += [helper.make_node("Conv", [prev, "wh", "bh"], ["logit"], pads=[1, 1, 1, 1]),
              helper.make_node("Sigmoid", ["logit"], ["fg"])]
    graph = helper.make_graph(
        nodes, "bench_fixed",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("fg", TensorProto.FLOAT, ["N", 1, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    ModelSpec(name="bench-fixed-conv5", version="1", task="nuclei", kind="instances", mpp=0.5,
              tile=1024, max_object_um=20.0, receptive_field_px=5, class_names=("nucleus",),
              outputs={"foreground": "fg"},
              postprocess={"threshold": 0.5, "min_distance_um": 2.5, "min_area_um2": 10.0}).save(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/_data/fixed_model")))
