"""Helpers shared by the training scripts (torch; ``train`` extra).

- :func:`seed_everything` for seeded runs;
- :func:`normalize`: a float [0, 255] batch to network input, as the spec says;
- :func:`cosine_lr` and :func:`ema_update`: pieces of the training loop
  (:mod:`napari_hemato.train.loop`);
- :func:`export_onnx` (export + onnxruntime ≈ torch check) and
  :func:`receptive_field_radius`.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# -- seeding -----------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch.

    ``torch.use_deterministic_algorithms`` is not called: it imports
    ``torch._inductor``, which crashes (SIGSEGV) in a process that has already
    loaded Qt/vispy/numba (e.g. a test session with napari viewers). CPU
    convolutions here are deterministic for a fixed thread count anyway.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def normalize(batch: torch.Tensor, normalization: Mapping) -> torch.Tensor:
    """Float (N, 3, H, W) in [0, 255] -> network input, as ``ModelSpec.normalize`` does.

    ``normalization`` is the spec's: ``mean`` and ``std`` per channel (scale 1/255).

    Examples
    --------
    >>> normalize(torch.full((1, 3, 1, 1), 255.0), {"mean": [0.5] * 3, "std": [0.25] * 3}).flatten()
    tensor([2., 2., 2.])
    """
    mean = torch.tensor(normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


# -- the training loop's pieces ------------------------------------------------
def cosine_lr(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2 % of ``base``.

    ``progress`` (0 → 1) is how far the decay has gone; trainers pass the
    larger of the step fraction and the wall-time fraction of a budget.

    Examples
    --------
    >>> [round(cosine_lr(s, p, 1.0, 10), 3) for s, p in ((0, 0), (9, 0), (50, 0.5), (99, 1))]
    [0.1, 1.0, 0.51, 0.02]
    """
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, max(float(progress), 0.0))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for float tensors; integers are copied."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


# -- export and checks -------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_name: str = "image",
    output_names: Sequence[str],
    example: torch.Tensor,
    check_inputs: Sequence[torch.Tensor] = (),
    atol: float = 1e-4,
    opset: int = 17,
    spatial: bool = True,
) -> float:
    """Export ``model`` (eval mode) to a single-file ONNX with dynamic N, H, W (N: not ``spatial``).

    The export is checked with ``onnx.checker`` and by running onnxruntime on
    ``example`` and every tensor of ``check_inputs``: the largest absolute
    difference to torch, divided by the output's largest magnitude where that
    exceeds 1 (class activation maps), must stay below ``atol``.

    Returns
    -------
    float
        The largest (scaled) difference seen.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dyn = {0: "N", 2: "H", 3: "W"} if spatial else {0: "N"}
    # the TorchScript exporter handles these small conv nets reliably and gives one
    # self-contained file; torch >= 2.9 warns that it is no longer the default
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes={input_name: dyn, **{n: dyn for n in output_names}},
            opset_version=opset,
            external_data=False,
            dynamo=False,
        )
    from napari_hemato.finetune import onnx_edit

    graph = onnx.load(str(path))
    if onnx_edit.elementwise_softmax(graph):  # class maps: 17 % faster on the CPU, same values
        onnx_edit.save(graph, path)  # (checked against torch below like the rest)
    onnx.checker.check_model(onnx.load(str(path)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (example, *check_inputs):
        with torch.no_grad():
            ref = model(x)
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(list(output_names), {input_name: x.numpy()})
        for r, g in zip(ref, got, strict=True):
            if tuple(r.shape) != g.shape:
                raise AssertionError(f"onnx output shape {g.shape} != torch {tuple(r.shape)}")
            scale = max(1.0, float(np.abs(r.numpy()).max()))
            worst = max(worst, float(np.abs(r.numpy() - g).max()) / scale)
    if not worst < atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.2e} (> {atol:.0e})")
    log.info(
        "exported %s (%.2f MB), max |onnx - torch| = %.2e", path, path.stat().st_size / 1e6, worst
    )
    return worst


def receptive_field_radius(model: nn.Module, *, size: int = 256, channels: int = 3) -> int:
    """Half-width (px) of the theoretical receptive field of a dense model.

    Back-propagates from the centre output pixel through the model in eval
    mode and returns the largest distance (∞-norm) from the centre at which
    the input gradient is non-zero. ``size`` must exceed twice the radius.
    """
    import copy

    model = copy.deepcopy(model).eval()
    for name, mod in list(model.named_modules()):  # linearise: no dead ReLUs
        if isinstance(mod, nn.ReLU) and name:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], nn.Identity())
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    y = model(x)
    y = torch.cat(list(y), dim=1) if isinstance(y, tuple | list) else y
    c = size // 2
    y[0, :, c, c].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1))
    ii, jj = torch.nonzero(g > 0, as_tuple=True)
    radius = int(max((ii - c).abs().max(), (jj - c).abs().max()))
    if radius >= c - 1:
        raise ValueError(f"receptive field reaches the border of a {size}px probe: use larger size")
    return radius
